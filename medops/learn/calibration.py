"""calibration: fold a Platt/temperature calibration into the model's output layer.

The calibration p = sigmoid(a * z + b) of the model's logit z (fitted on val by
``medops.metrics.fit_platt``) is folded into the final ``Dense(1, sigmoid)`` layer named
``probability``: its kernel becomes a * W and its bias a * bias + b, so z' = a * z + b exactly (up to
float32 rounding). The saved, exported (ONNX) and served model then outputs calibrated
probabilities with no extra layer, and the serving contract does not change.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medops.errors import MedopsError
from medops.models import OUTPUT_NAME


def output_layer(model: Any) -> Any:
    """The model's ``probability`` layer: a Dense layer with one unit and a sigmoid."""
    import keras

    try:
        layer = model.get_layer(OUTPUT_NAME)
    except ValueError:
        raise MedopsError(f"model {model.name} has no layer named {OUTPUT_NAME!r}") from None
    if not isinstance(layer, keras.layers.Dense) or layer.units != 1 or \
            getattr(layer.activation, "__name__", "") != "sigmoid":
        raise MedopsError(f"calibration needs {OUTPUT_NAME!r} to be Dense(1, sigmoid), got {layer}")
    return layer


def model_logits(model: Any, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """The logit z (the output layer's input times its kernel plus bias, in float64) per image."""
    import keras

    from medops.learn.input_pipeline import build_input_pipeline

    layer = output_layer(model)
    features = keras.Model(model.inputs, layer.input)
    ds = build_input_pipeline(images, None, batch_size=batch_size, training=False)
    h = np.asarray(features.predict(ds, verbose=0), dtype=np.float64)
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in layer.get_weights())
    return (h @ kernel + bias).reshape(-1)


def fold_calibration(model: Any, a: float, b: float) -> None:
    """Make ``model``'s output sigmoid(a * z + b) in place (see the module docstring)."""
    if not (np.isfinite(a) and np.isfinite(b)) or a <= 0:
        raise MedopsError(f"calibration must be increasing and finite, got a={a}, b={b}")
    layer = output_layer(model)
    kernel, bias = layer.get_weights()
    layer.set_weights([(kernel.astype(np.float64) * a).astype(kernel.dtype),
                       (bias.astype(np.float64) * a + b).astype(bias.dtype)])
