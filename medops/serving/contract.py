"""The Triton model contract, defined once, and the two ``config.pbtxt`` flavours rendered from it.

The classifier takes ``image`` (float32, ``[S, S, 1]`` per item, S = ``ingest.image_size``) and
answers ``probability`` (float32, ``[1]`` per item, the probability of pneumonia). The production
flavour serves the ONNX file with Triton's onnxruntime backend on a GPU; the embedded flavour serves
the same file with a Python-backend ``model.py`` (onnxruntime on the CPU), because the tritonserver
in the nvidia-pytriton wheel ships only the Python backend. Everything a client can see (name,
tensors, dtypes, dims, max_batch_size, batching) is identical between the two; a contract test parses
both renderings with Triton's own protobuf and compares them.

This module imports neither TensorFlow nor tritonclient.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Sequence

from medops.config import ServingConfig

Flavour = Literal["production", "embedded"]
FLAVOURS: tuple[Flavour, ...] = ("production", "embedded")

INPUT_NAME = "image"
OUTPUT_NAME = "probability"
LABELS: tuple[str, str] = ("normal", "pneumonia")

# The file names Triton looks for inside a version folder.
ONNX_FILENAME = "model.onnx"
PYTHON_FILENAME = "model.py"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: Triton name, Triton data type and per-item dims (batch dim excluded)."""

    name: str
    data_type: str  # Triton's DataType enum name, e.g. "TYPE_FP32"
    dims: tuple[int, ...]

    @property
    def numpy_dtype(self) -> str:
        return _NUMPY_DTYPES[self.data_type]

    @property
    def client_dtype(self) -> str:
        """The datatype string tritonclient's InferInput expects ("FP32")."""
        return self.data_type.removeprefix("TYPE_")


_NUMPY_DTYPES = {"TYPE_FP32": "float32", "TYPE_STRING": "object", "TYPE_INT64": "int64"}


@dataclass(frozen=True)
class ModelContract:
    """What a client of the classifier relies on, whichever backend serves it."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    labels: tuple[str, ...] = LABELS

    @property
    def image_size(self) -> int:
        return self.inputs[0].dims[0]


def build_contract(cfg: ServingConfig, *, image_size: int) -> ModelContract:
    """The classifier contract for ``cfg`` and model input size ``image_size``.

    Raises:
        ValueError: a preferred batch size exceeds ``max_batch_size`` (Triton would refuse the
            config at load time with a less direct message).
    """
    too_big = [b for b in cfg.preferred_batch_sizes if not 1 <= b <= cfg.max_batch_size]
    if too_big:
        raise ValueError(
            f"serving.preferred_batch_sizes {too_big} must lie in 1..max_batch_size "
            f"({cfg.max_batch_size})"
        )
    return ModelContract(
        name=cfg.model_name,
        inputs=(TensorSpec(INPUT_NAME, "TYPE_FP32", (image_size, image_size, 1)),),
        outputs=(TensorSpec(OUTPUT_NAME, "TYPE_FP32", (1,)),),
        max_batch_size=cfg.max_batch_size,
        preferred_batch_sizes=tuple(sorted(set(cfg.preferred_batch_sizes))),
        max_queue_delay_us=cfg.max_queue_delay_us,
    )


def _tensor_block(kind: str, specs: tuple[TensorSpec, ...]) -> str:
    items = ",\n".join(
        f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n'
        f"    dims: [ {', '.join(str(d) for d in s.dims)} ]\n  }}"
        for s in specs
    )
    return f"{kind} [\n{items}\n]"


def render_config(
    contract: ModelContract, flavour: Flavour, *, versions: Sequence[int] | None = None
) -> str:
    """Render ``config.pbtxt`` (protobuf text format of Triton's ModelConfig) for ``flavour``.

    production: ``platform: "onnxruntime_onnx"`` / ``backend: "onnxruntime"`` on one GPU instance.
    embedded: ``backend: "python"`` (the version folder's model.py) on one CPU instance.
    Both: the same name, tensors, max_batch_size, dynamic batching and ``labels`` parameter.

    Args:
        versions: serve exactly these versions (``version_policy: specific``); deploy uses it to
            write a new version beside the served one without serving it yet. None: Triton's
            default policy, the latest version.
    """
    if flavour == "production":
        header = 'platform: "onnxruntime_onnx"\nbackend: "onnxruntime"'
        instances = "instance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n  }\n]"
    elif flavour == "embedded":
        header = 'backend: "python"'
        instances = "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]"
    else:
        raise ValueError(f"unknown config flavour {flavour!r}; expected one of {FLAVOURS}")
    preferred = ", ".join(str(b) for b in contract.preferred_batch_sizes)
    batching = (
        "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {preferred} ]\n" if preferred else "")
        + f"  max_queue_delay_microseconds: {contract.max_queue_delay_us}\n}}"
    )
    labels = (
        'parameters {\n  key: "labels"\n  value {\n'
        f"    string_value: {json.dumps(','.join(contract.labels))}\n  }}\n}}"
    )
    policy = (
        [f"version_policy: {{ specific: {{ versions: [ {', '.join(str(v) for v in versions)} ] }} }}"]
        if versions else []
    )
    parts = [
        f"# Rendered by medops.serving.contract ({flavour}); do not edit by hand.",
        f'name: "{contract.name}"',
        header,
        *policy,
        f"max_batch_size: {contract.max_batch_size}",
        _tensor_block("input", contract.inputs),
        _tensor_block("output", contract.outputs),
        batching,
        instances,
        labels,
    ]
    return "\n".join(parts) + "\n"
