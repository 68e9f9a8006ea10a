"""resnet: a small ResNet (He et al., 2016) for 28-64 px grey images.

A 3x3 stem, then one stage per entry of ``cfg.filters``, each of two basic residual blocks
(3x3 conv - BN - ReLU - 3x3 conv - BN, plus the identity or a 1x1 projection); stages after the
first halve the resolution. Global average pooling, dropout ``cfg.dropout`` and a sigmoid unit named
``probability``. Batch-norm momentum is 0.9 rather than Keras' 0.99 so the moving statistics
settle within the few hundred steps of a CPU run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from medops.config import TrainConfig

BN_MOMENTUM = 0.9


def residual_block(x, filters: int, stride: int, name: str):
    from keras import layers

    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = layers.Activation("relu", name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation("relu", name=f"{name}_out")(y)


def build(cfg: TrainConfig, input_shape: Sequence[int]) -> "keras.Model":
    import keras
    from keras import layers

    inputs = keras.Input(shape=tuple(input_shape), name="image", dtype="float32")
    x = layers.Conv2D(cfg.filters[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    for stage, filters in enumerate(cfg.filters):
        for block in range(2):
            stride = 2 if (stage > 0 and block == 0) else 1
            x = residual_block(x, filters, stride, name=f"s{stage + 1}b{block + 1}")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model(inputs, outputs, name="resnet")
