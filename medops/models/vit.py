"""vit: a compact vision transformer with a convolutional stem, for small grey images.

Small-data ViTs train poorly from raw patches, so (as in Hassani et al.'s Compact Convolutional
Transformers) a two-conv stem makes the tokens: 3x3 conv, then two stride-2 3x3 convs to an
(S/4 x S/4) grid of ``dim = cfg.filters[-1]`` channels (49 tokens at 28 px). Positions come from a
3x3 depthwise convolution added to the grid (a conditional position encoding, Chu et al. 2021), so
no custom layer is needed and any input size works. Then ``len(cfg.filters)`` pre-norm
transformer blocks (4-head self-attention, 2x MLP with swish: exact GELU lowers to the Erfc op,
which ONNX lacks), layer norm, average over tokens, dropout and a
sigmoid ``probability``. All standard Keras layers: loads without custom objects and converts to
ONNX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from medops.config import TrainConfig

HEADS = 4


def transformer_block(x, dim: int, dropout: float, name: str):
    from keras import layers

    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x)
    y = layers.MultiHeadAttention(HEADS, key_dim=max(dim // HEADS, 8), dropout=dropout, name=f"{name}_mha")(y, y)
    x = layers.Add(name=f"{name}_add1")([x, y])
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x)
    y = layers.Dense(2 * dim, activation="swish", name=f"{name}_mlp1")(y)
    y = layers.Dropout(dropout, name=f"{name}_drop")(y)
    y = layers.Dense(dim, name=f"{name}_mlp2")(y)
    return layers.Add(name=f"{name}_add2")([x, y])


def build(cfg: TrainConfig, input_shape: Sequence[int]) -> "keras.Model":
    import keras
    from keras import layers

    dim = int(cfg.filters[-1])
    inputs = keras.Input(shape=tuple(input_shape), name="image", dtype="float32")
    x = layers.Conv2D(cfg.filters[0], 3, padding="same", activation="relu", name="stem1")(inputs)
    x = layers.Conv2D(dim, 3, strides=2, padding="same", activation="relu", name="stem2")(x)
    x = layers.Conv2D(dim, 3, strides=2, padding="same", name="stem3")(x)
    pos = layers.DepthwiseConv2D(3, padding="same", name="position")(x)
    x = layers.Add(name="add_position")([x, pos])
    x = layers.Reshape((-1, dim), name="tokens")(x)
    for i in range(len(cfg.filters)):
        x = transformer_block(x, dim, cfg.dropout / 2, name=f"block{i + 1}")
    x = layers.LayerNormalization(epsilon=1e-6, name="ln")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    x = layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model(inputs, outputs, name="vit")
