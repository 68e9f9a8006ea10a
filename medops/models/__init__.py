"""The model registry: architecture name (TrainConfig.model) -> builder.

Every builder takes ``(cfg: TrainConfig, input_shape)`` and returns an uncompiled keras.Model with
one input named ``image`` (float32, (S, S, 1), pixels in [0, 1]) and one sigmoid output of shape
(1,) from a layer named ``probability``: the names the ONNX export and the Triton contract use.
Architectures live one per module and are imported only when built, so importing this registry
does not import TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Sequence

from medops.errors import ConfigError

__all__ = ["INPUT_NAME", "MODELS", "OUTPUT_NAME", "build_model", "check_model_contract"]

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from medops.config import TrainConfig

# The tensors every model has: the names the ONNX export, the Triton contract (which takes them
# from here) and every client use.
INPUT_NAME = "image"
OUTPUT_NAME = "probability"

# name -> "module:function"
MODELS: dict[str, str] = {
    "simple_cnn": "medops.models.simple_cnn:build",
    "resnet": "medops.models.resnet:build",
    "efficientnet_b0": "medops.models.efficientnet:build",
    "vit": "medops.models.vit:build",
}


def build_model(name: str, cfg: "TrainConfig", input_shape: Sequence[int]) -> "keras.Model":
    """Build architecture ``name`` for inputs shaped ``input_shape`` (S, S, 1).

    Raises:
        ConfigError: unknown name (the message lists the registered ones) or a bad input shape.
    """
    try:
        target = MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r} in train.model; choices: {', '.join(sorted(MODELS))}"
        ) from None
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[-1] != 1 or shape[0] != shape[1]:
        raise ConfigError(f"model input must be (S, S, 1), got {shape}")
    module, func = target.split(":")
    model = getattr(importlib.import_module(module), func)(cfg, shape)
    check_model_contract(model, shape)
    return model


def check_model_contract(model: "keras.Model", input_shape: Sequence[int]) -> None:
    """Raise ConfigError unless the model has the input/output names and shapes serving expects."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError(f"model {model.name} must have one input and one output")
    in_name = model.inputs[0].name
    if in_name != INPUT_NAME:
        raise ConfigError(f"model {model.name} input is named {in_name!r}, expected {INPUT_NAME!r}")
    if tuple(model.inputs[0].shape[1:]) != tuple(input_shape):
        raise ConfigError(f"model {model.name} input shape {model.inputs[0].shape}, expected {input_shape}")
    if tuple(model.outputs[0].shape[1:]) != (1,):
        raise ConfigError(f"model {model.name} output shape {model.outputs[0].shape}, expected (None, 1)")
    if OUTPUT_NAME not in [layer.name for layer in model.layers]:
        raise ConfigError(f"model {model.name} has no layer named {OUTPUT_NAME!r}")
