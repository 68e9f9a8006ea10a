"""efficientnet_b0: keras.applications.EfficientNetB0 (Tan & Le, 2019), trained from scratch.

``weights=None`` (ImageNet weights expect 3 colour channels and are not shipped offline) and one
input channel. Keras' EfficientNet (v1) always divides its input by 255 in its first layer, so the
[0, 1] pixels are multiplied by 255 first and the backbone sees the range it was designed for.
Its stem and five stride-2 stages need at least 32 px, so smaller inputs are upsampled inside the
model (bilinear Resizing to 32 px): the exported ONNX model still takes the ingest size, and serving is
unchanged. Then global average pooling, dropout ``cfg.dropout`` and a sigmoid ``probability``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from medops.config import TrainConfig

MIN_SIZE = 32


def build(cfg: TrainConfig, input_shape: Sequence[int]) -> "keras.Model":
    import keras
    from keras import layers

    size = int(input_shape[0])
    inputs = keras.Input(shape=tuple(input_shape), name="image", dtype="float32")
    x = inputs
    if size < MIN_SIZE:
        size = MIN_SIZE
        x = layers.Resizing(size, size, interpolation="bilinear", name="upsample")(x)
    backbone = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(size, size, 1), pooling="avg",
    )
    x = layers.Rescaling(255.0, name="to_uint8_range")(x)
    x = backbone(x)
    x = layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model(inputs, outputs, name="efficientnet_b0")
