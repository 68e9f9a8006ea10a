"""The Triton model contract, defined once, and the two ``config.pbtxt`` flavours rendered from it.

The classifier takes ``image`` (float32, ``[S, S, 1]`` per item, S = ``ingest.image_size``) and
answers ``probability`` (float32, ``[1]`` per item, the probability of pneumonia), ``ood_score``
(float32, ``[1]``: the out-of-distribution guard's score, > 1.0 = unlike the training data) and
``in_distribution`` (bool, ``[1]``), all three from one ONNX graph (medops.stages.export). A model
exported before the guard answers ``probability`` only: the embedded backend then answers
``ood_score`` NaN and ``in_distribution`` true (clients read NaN as "no score"); the production
onnxruntime backend needs a model exported with the guard. The production
flavour serves the ONNX file with Triton's onnxruntime backend on a GPU; the embedded flavour serves
the same file with a Python-backend ``model.py`` (onnxruntime on the CPU), because the tritonserver
in the nvidia-pytriton wheel ships only the Python backend. Everything a client can see (name,
tensors, dtypes, dims, max_batch_size, batching) is identical between the two; a contract test parses
both renderings with Triton's own protobuf and compares them.

This module imports neither TensorFlow nor tritonclient.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from medops.config import PreprocessSpec, ServingConfig, Window
from medops.models import INPUT_NAME, OUTPUT_NAME  # the models' tensor names, served as they are

# The out-of-distribution guard's outputs (medops.learn.ood), answered beside the probability by
# the same ONNX graph: ood_score > 1.0 means the image is unlike the training data.
OOD_SCORE_OUTPUT = "ood_score"
IN_DISTRIBUTION_OUTPUT = "in_distribution"
GUARDED_OUTPUTS: tuple[str, str, str] = (OUTPUT_NAME, OOD_SCORE_OUTPUT, IN_DISTRIBUTION_OUTPUT)

Flavour = Literal["production", "embedded"]
FLAVOURS: tuple[Flavour, ...] = ("production", "embedded")

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
    tensorrt_fp16: bool = False  # production: onnxruntime's TensorRT execution accelerator, FP16
    ood_action: str = "flag"     # serving.ood_action: an out-of-distribution answer's label kept or withheld
    instances: int = 0           # serving.instances: embedded Python-backend instances; 0 = one per core

    @property
    def image_size(self) -> int:
        return self.inputs[0].dims[0]


def build_contract(cfg: ServingConfig, *, image_size: int) -> ModelContract:
    """The classifier contract for ``cfg`` and model input size ``image_size`` (``cfg`` keeps its
    preferred batch sizes within ``max_batch_size``: ServingConfig validates that)."""
    return ModelContract(
        name=cfg.model_name,
        inputs=(TensorSpec(INPUT_NAME, "TYPE_FP32", (image_size, image_size, 1)),),
        outputs=(TensorSpec(OUTPUT_NAME, "TYPE_FP32", (1,)),
                 TensorSpec(OOD_SCORE_OUTPUT, "TYPE_FP32", (1,)),
                 TensorSpec(IN_DISTRIBUTION_OUTPUT, "TYPE_BOOL", (1,))),
        max_batch_size=cfg.max_batch_size,
        preferred_batch_sizes=tuple(sorted(set(cfg.preferred_batch_sizes))),
        max_queue_delay_us=cfg.max_queue_delay_us,
        tensorrt_fp16=cfg.tensorrt_fp16,
        ood_action=cfg.ood_action,
        instances=cfg.instances,
    )


def _tensor_block(kind: str, specs: tuple[TensorSpec, ...]) -> str:
    items = ",\n".join(
        f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n'
        f"    dims: [ {', '.join(str(d) for d in s.dims)} ]\n  }}"
        for s in specs
    )
    return f"{kind} [\n{items}\n]"


def instance_count(contract: ModelContract, flavour: Flavour) -> int:
    """Instances of each model: one GPU classifier instance in production (Triton runs its
    onnxruntime sessions there); in the embedded server ``serving.instances``, 0 meaning one per
    CPU core of the machine rendering it (the serving machine: deploy renders there), each
    instance a process with one onnxruntime thread, so every core works on a batch."""
    if flavour == "production":
        return max(1, contract.instances)
    return contract.instances or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                     else (os.cpu_count() or 1))


def _instances(kind: str, count: int = 1) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]"


def _batching(contract: ModelContract) -> str:
    preferred = ", ".join(str(b) for b in contract.preferred_batch_sizes)
    return (
        "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {preferred} ]\n" if preferred else "")
        + f"  max_queue_delay_microseconds: {contract.max_queue_delay_us}\n}}"
    )


def _parameters(params: dict[str, str]) -> list[str]:
    return [
        f'parameters {{\n  key: "{k}"\n  value {{\n    string_value: {json.dumps(v)}\n  }}\n}}'
        for k, v in params.items()
    ]


def _policy(versions: Sequence[int] | None) -> list[str]:
    if not versions:
        return []
    return [f"version_policy: {{ specific: {{ versions: [ {', '.join(str(v) for v in versions)} ] }} }}"]


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown config flavour {flavour!r}; expected one of {FLAVOURS}")


def render_config(
    contract: ModelContract, flavour: Flavour, *, versions: Sequence[int] | None = None
) -> str:
    """Render ``config.pbtxt`` (protobuf text format of Triton's ModelConfig) for ``flavour``.

    production: ``platform: "onnxruntime_onnx"`` / ``backend: "onnxruntime"`` on one GPU instance.
    embedded: ``backend: "python"`` (the version folder's model.py) on ``instance_count`` CPU
    instances.
    Both: the same name, tensors, max_batch_size, dynamic batching and ``labels`` parameter.

    Args:
        versions: serve exactly these versions (``version_policy: specific``); deploy uses it to
            write a new version beside the served one without serving it yet. None: Triton's
            default policy, the latest version.
    """
    _check_flavour(flavour)
    production = flavour == "production"
    if production:
        header, kind = 'platform: "onnxruntime_onnx"\nbackend: "onnxruntime"', "KIND_GPU"
    else:
        header, kind = 'backend: "python"', "KIND_CPU"
    policy = _policy(versions)
    if production and not policy:
        # serve one version; `medops deploy` pins versions explicitly when it switches
        policy = ["version_policy: { latest: { num_versions: 1 } }"]
    parts = [
        f"# Rendered by medops.serving.contract ({flavour}); do not edit by hand.",
        f'name: "{contract.name}"',
        header,
        *policy,
        f"max_batch_size: {contract.max_batch_size}",
        _tensor_block("input", contract.inputs),
        _tensor_block("output", contract.outputs),
        _batching(contract),
        _instances(kind, 1 if production else instance_count(contract, flavour)),
        *([_warmup(contract)] if production else []),
        *([_tensorrt_fp16()] if production and contract.tensorrt_fp16 else []),
        *_parameters({"labels": ",".join(contract.labels)}),
    ]
    return "\n".join(parts) + "\n"


def warmup_batch_sizes(contract: ModelContract) -> list[int]:
    """The batch sizes the production flavour warms up: 1, the preferred ones, the largest."""
    return sorted({1, *contract.preferred_batch_sizes, contract.max_batch_size})


def _warmup(contract: ModelContract) -> str:
    """One zero-filled request per batch size Triton prefers to form (1, the preferred sizes and
    the largest), run at load time, so the first real requests do not pay for GPU kernel
    selection (and TensorRT engine building)."""
    spec = contract.inputs[0]
    dims = ", ".join(str(d) for d in spec.dims)
    sizes = warmup_batch_sizes(contract)
    items = ",\n".join(
        f"""  {{
    name: "zeros_batch_{b}"
    batch_size: {b}
    inputs {{
      key: "{spec.name}"
      value {{
        data_type: {spec.data_type}
        dims: [ {dims} ]
        zero_data: true
      }}
    }}
  }}"""
        for b in sizes
    )
    return f"model_warmup [\n{items}\n]"


def _tensorrt_fp16() -> str:
    return """optimization {
  execution_accelerators {
    gpu_execution_accelerator: [
      {
        name: "tensorrt"
        parameters { key: "precision_mode" value: "FP16" }
        parameters { key: "max_workspace_size_bytes" value: "1073741824" }
      }
    ]
  }
}"""


# -- the DICOM-bytes ensemble -------------------------------------------------------------------
# embedded:   postprocess N (one Python model: the DICOM preprocessing, the classifier's ONNX
#             version N run inline, label, drift record): one step, no process hop between them
# production: preprocess (Python) -> classifier N (onnxruntime backend, GPU) -> postprocess N
#             (Python: label, drift record)

DICOM_INPUT = "dicom"
LABEL_OUTPUT = "label"
ERROR_OUTPUT = "error"
PREPROCESS_BACKEND = "dicom_preprocess.py"
POSTPROCESS_BACKEND = "postprocess.py"
RECORDER_BACKEND = "drift_recorder.py"  # the recording functions the postprocessing model calls
DRIFT_TENSOR = "drift_features"   # preprocess -> postprocess: one JSON object per item (medops.drift)
OOD_SCORE = "ood_score"           # recorded when the classifier declares it


@dataclass(frozen=True)
class EnsembleContract:
    """Raw DICOM bytes in; probability, label and a per-item error out.

    ``error`` is "" for an answered item, else ``"<quarantine reason>: <message>"``: a file that
    is not DICOM (or too large) is an answer about that file, not a failed request.
    The ensemble's version number is the classifier version it is pinned to, so the
    ``model_version`` of an ensemble response says which classifier answered.
    """

    classifier: ModelContract
    preprocessing: PreprocessSpec        # ingest.preprocessing: the server prepares pixels as ingest did
    threshold: float
    max_bytes: int                       # serving.max_request_bytes
    max_pixels: int                      # serving.max_image_pixels
    record: RecordSettings | None = None  # serving.record: the postprocessing model records, or not
    # what deploy and rollback write (serving.flavor): embedded serves the DICOM path as one
    # Python model; production as preprocess -> onnxruntime-backend classifier -> postprocess
    flavour: Flavour = "embedded"

    @property
    def recorder_name(self) -> str:
        """The drift recorder model of repositories written before the postprocessing model
        recorded (none is written now)."""
        return f"{self.classifier.name}_recorder"

    @property
    def preprocess_name(self) -> str:
        return f"{self.classifier.name}_preprocess"

    @property
    def postprocess_name(self) -> str:
        return f"{self.classifier.name}_postprocess"

    @property
    def ensemble_name(self) -> str:
        return ensemble_name(self.classifier.name)

    @property
    def preprocess(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        drift = (TensorSpec(DRIFT_TENSOR, "TYPE_STRING", (1,)),) if self.record else ()
        return ((TensorSpec(DICOM_INPUT, "TYPE_STRING", (1,)),),
                (self.classifier.inputs[0], TensorSpec(ERROR_OUTPUT, "TYPE_STRING", (1,)), *drift))

    @property
    def recorded_outputs(self) -> tuple[TensorSpec, ...]:
        """The classifier outputs a drift record takes: ``probability``, and ``ood_score`` when
        the classifier declares it."""
        return tuple(o for o in self.classifier.outputs if o.name in (OUTPUT_NAME, OOD_SCORE))

    def postprocess_tensors(self, flavour: Flavour) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The postprocessing model's (inputs, outputs). Embedded: the whole DICOM path in one
        model, the ensemble's ``dicom`` in, its outputs out (it preprocesses, runs the
        classifier's ONNX, labels and records). Production: the classifier's ``probability``
        and ``in_distribution`` (and, recording, ``ood_score`` and ``drift_features``) and
        ``error`` in, ``label`` out."""
        _check_flavour(flavour)
        error = TensorSpec(ERROR_OUTPUT, "TYPE_STRING", (1,))
        drift = (TensorSpec(DRIFT_TENSOR, "TYPE_STRING", (1,)),) if self.record else ()
        label = TensorSpec(LABEL_OUTPUT, "TYPE_STRING", (1,))
        if flavour == "embedded":
            return self.ensemble
        wanted = {OUTPUT_NAME, IN_DISTRIBUTION_OUTPUT} | ({OOD_SCORE} if self.record else set())
        answers = tuple(o for o in self.classifier.outputs if o.name in wanted)
        return (*answers, error, *drift), (label,)

    @property
    def ensemble(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return ((TensorSpec(DICOM_INPUT, "TYPE_STRING", (1,)),),
                (*self.classifier.outputs, TensorSpec(LABEL_OUTPUT, "TYPE_STRING", (1,)),
                 TensorSpec(ERROR_OUTPUT, "TYPE_STRING", (1,))))


@dataclass(frozen=True)
class RecordSettings:
    """Where the recorder appends (``serving.record_dir``: relative to the server's working
    folder, which the embedded server sets to its state folder) and the log's size bound."""

    directory: str = "drift"
    max_bytes: int = 64 * 1024 * 1024
    keep: int = 3


def record_settings(cfg: ServingConfig) -> RecordSettings | None:
    """``serving.record*`` as the recorder's settings; None when recording is off."""
    if not cfg.record:
        return None
    return RecordSettings(cfg.record_dir, int(cfg.record_max_mb * 1024 * 1024), cfg.record_keep)


def ensemble_name(model_name: str) -> str:
    """The name of the DICOM-bytes ensemble in front of classifier ``model_name``."""
    return f"{model_name}_dicom"


def build_ensemble_contract(cfg: ServingConfig, preprocessing: PreprocessSpec, *,
                            threshold: float = 0.5) -> EnsembleContract:
    """The ensemble around ``build_contract(cfg, image_size=preprocessing.image_size)``.

    Args:
        cfg: the serving settings, with the limits past which an upload is answered with an
            error instead of being decoded: ``max_request_bytes`` (bytes) and
            ``max_image_pixels`` (rows x columns x frames x samples).
        preprocessing: ``ingest.preprocessing``: the server prepares pixels exactly as ingest
            prepared the training data.
        threshold: ``evaluate.threshold``: probability at or above which the label is pneumonia.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    return EnsembleContract(build_contract(cfg, image_size=preprocessing.image_size), preprocessing,
                            float(threshold), int(cfg.max_request_bytes), int(cfg.max_image_pixels),
                            record=record_settings(cfg))


def _python_model(ec: EnsembleContract, name: str, tensors, params: dict[str, str],
                  flavour: Flavour) -> str:
    _check_flavour(flavour)
    inputs, outputs = tensors
    parts = [
        f"# Rendered by medops.serving.contract ({flavour}); do not edit by hand.",
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {ec.classifier.max_batch_size}",
        _tensor_block("input", inputs),
        _tensor_block("output", outputs),
        _batching(ec.classifier),
        # DICOM decoding and labelling are CPU work in production too
        _instances("KIND_CPU", instance_count(ec.classifier, flavour)),
        *_parameters(params),
    ]
    return "\n".join(parts) + "\n"


def render_preprocess_config(ec: EnsembleContract, flavour: Flavour) -> str:
    """The preprocessing model: raw DICOM bytes -> ``image`` (medops.dicom.pixels) and ``error``."""
    return _python_model(ec, ec.preprocess_name, ec.preprocess, preprocess_parameters(ec), flavour)


def preprocess_parameters(ec: EnsembleContract) -> dict[str, str]:
    """The preprocessing settings and limits as model parameters (read back by
    :func:`preprocessing_from_parameters`): the preprocessing model's, and the embedded
    postprocessing model's, which preprocesses itself."""
    spec = ec.preprocessing
    params = {"image_size": str(spec.image_size), "max_bytes": str(ec.max_bytes),
              "max_pixels": str(ec.max_pixels), "frame": spec.frame}
    if spec.window is not None:
        params |= {"window_center": repr(float(spec.window.center)),
                   "window_width": repr(float(spec.window.width))}
    if spec.pixel_spacing is not None:
        params |= {"pixel_spacing": repr(spec.pixel_spacing)}
    if ec.record is not None:
        params |= {"record": "true"}
    return params


def preprocessing_from_parameters(params: Mapping[str, str]) -> PreprocessSpec:
    """The PreprocessSpec that :func:`render_preprocess_config` wrote into the preprocessing
    model's parameters (what its ``model.py`` reads back; a config rendered before ``frame`` or
    ``pixel_spacing`` existed means ``middle`` and none)."""
    window = None
    if "window_center" in params:
        window = Window(center=float(params["window_center"]), width=float(params["window_width"]))
    spacing = params.get("pixel_spacing")
    frame: Any = params.get("frame", "middle")  # PreprocessSpec checks it
    return PreprocessSpec(int(params["image_size"]), window, frame, float(spacing) if spacing else None)


THRESHOLD_PARAM = "threshold"
OOD_ACTION_PARAM = "ood_action"  # flag: label every answer; withhold: "" for out-of-distribution ones
CLASSIFIER_PARAM = "classifier"  # embedded postprocessing: the model whose ONNX versions it runs


def version_threshold_param(version: int | str) -> str:
    """The postprocess parameter holding the threshold of (classifier) ``version``."""
    return f"{THRESHOLD_PARAM}.{version}"


def render_postprocess_config(ec: EnsembleContract, flavour: Flavour, *,
                              thresholds: Mapping[int, float] | None = None) -> str:
    """The postprocessing model: the answer -> ``label``, and the drift record of each item
    (``serving.record``: appended to the drift log, ``medops.drift.RequestLog``). Embedded, it
    is the whole DICOM path: it also preprocesses (the preprocessing model's parameters) and
    runs the classifier (``classifier`` parameter: version N runs ``<classifier>/N/model.onnx``
    of the same repository), so the ensemble has one step (``postprocess_tensors``).

    Args:
        thresholds: ``{version: threshold}``: serve exactly these versions, version N labelling
            at ``threshold.N`` (deploy keeps postprocess N in lockstep with classifier N, so a
            label always uses the threshold of the version whose probability it labels). None:
            one ``threshold`` parameter (``ec.threshold``) for the latest version.
    """
    if thresholds is None:
        params = {THRESHOLD_PARAM: repr(ec.threshold)}
    else:
        params = {version_threshold_param(v): repr(float(t)) for v, t in sorted(thresholds.items())}
    params["labels"] = ",".join(ec.classifier.labels)
    params[OOD_ACTION_PARAM] = ec.classifier.ood_action
    if flavour == "embedded":
        params[CLASSIFIER_PARAM] = ec.classifier.name
        params |= preprocess_parameters(ec)
    if ec.record is not None:
        params |= {"record_dir": ec.record.directory, "record_max_bytes": str(ec.record.max_bytes),
                   "record_keep": str(ec.record.keep)}
    text = _python_model(ec, ec.postprocess_name, ec.postprocess_tensors(flavour), params, flavour)
    if thresholds is None:
        return text
    head, rest = text.split("\nmax_batch_size:", 1)
    return "\n".join([head, *_policy(sorted(thresholds))]) + "\nmax_batch_size:" + rest


def render_ensemble_config(ec: EnsembleContract, *, classifier_version: int | None,
                           flavour: Flavour | None = None) -> str:
    """The ensemble, pinned to ``classifier_version`` (its own only version) for the classifier
    and the postprocessing model (which hold that version's model and threshold); None: latest.

    Embedded: the postprocessing model alone (which preprocesses and runs the classifier's ONNX
    itself); production: preprocess -> classifier (onnxruntime backend) -> postprocess. The drift record, with
    ``serving.record``, is written by the postprocessing model; the ensemble's outputs are the
    same either way. ``flavour``: None = the contract's own (``ec.flavour`` where the contract
    carries one, else embedded).
    """
    flavour = flavour or getattr(ec, "flavour", "embedded")
    _check_flavour(flavour)
    inputs, outputs = ec.ensemble
    image = "preprocessed_image"
    cv = -1 if classifier_version is None else classifier_version

    def step(model: str, version: int, ins: dict[str, str], outs: dict[str, str]) -> str:
        maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in ins.items()]
        maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outs.items()]
        return ("    {\n" f'      model_name: "{model}"\n      model_version: {version}\n'
                + "\n".join(maps) + "\n    }")

    # Triton wants every step to have an output, every tensor to be used, and every ensemble
    # output asked for: the preprocessing model's ``error`` is both an output and an input.
    post_in, post_out = ec.postprocess_tensors(flavour)
    drift = {DRIFT_TENSOR: DRIFT_TENSOR} if ec.record else {}
    steps = []
    if flavour == "production":
        steps.append(step(ec.preprocess_name, -1, {DICOM_INPUT: DICOM_INPUT},
                          {INPUT_NAME: image, ERROR_OUTPUT: ERROR_OUTPUT} | drift))
        steps.append(step(ec.classifier.name, cv, {INPUT_NAME: image}, {o: o for o in GUARDED_OUTPUTS}))
    steps.append(step(ec.postprocess_name, cv,
                      {t.name: image if t.name == INPUT_NAME else t.name for t in post_in},
                      {t.name: t.name for t in post_out}))
    parts = [
        f"# Rendered by medops.serving.contract (ensemble, {flavour}); do not edit by hand.",
        f'name: "{ec.ensemble_name}"',
        'platform: "ensemble"',
        *_policy(None if classifier_version is None else [classifier_version]),
        f"max_batch_size: {ec.classifier.max_batch_size}",
        _tensor_block("input", inputs),
        _tensor_block("output", outputs),
        "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}",
    ]
    return "\n".join(parts) + "\n"
