"""simple_cnn: the classic Conv-Pool x3 -> Dense classifier for small grey images.

One block per entry of ``cfg.filters`` (3x3 conv with ReLU, 2x2 max-pool), then flatten,
a Dense(``cfg.dense_units``) ReLU layer, dropout ``cfg.dropout`` and a sigmoid
unit named ``probability``. Pooling stops halving once the feature map is 2 px wide, so deeper
``filters`` lists also work on 28 px inputs. No batch normalization: with the few hundred steps
of a short run its moving statistics have not settled, and inference-mode outputs collapse to one
class even when training-mode AUC is high.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from medops.config import TrainConfig


def build(cfg: TrainConfig, input_shape: Sequence[int]) -> "keras.Model":
    import keras
    from keras import layers

    inputs = keras.Input(shape=tuple(input_shape), name="image", dtype="float32")
    x = inputs
    size = input_shape[0]
    for i, filters in enumerate(cfg.filters):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i + 1}")(x)
        if size >= 4:
            x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
            size //= 2
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(cfg.dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model(inputs, outputs, name="simple_cnn")
