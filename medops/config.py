"""Typed configuration: one pydantic model per params.yaml section.

``extra="forbid"`` everywhere, so a typo in params.yaml (or in a Prefect UI form, which these same
models type) fails at load time with the key's name. This module imports neither TensorFlow nor
Prefect.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medops.atomic import write_text
from medops.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthConfig(_Section):
    seed: int = 20261121
    modality: Literal["CR", "DX"] = "CR"
    images_per_patient: tuple[int, int] = (2, 5)
    max_images_per_split: int | None = Field(default=None, ge=1)
    institution: str = "St. Synthetic General Hospital"

    @model_validator(mode="after")
    def _range(self) -> "SynthConfig":
        lo, hi = self.images_per_patient
        if not 1 <= lo <= hi:
            raise ValueError(f"images_per_patient must be [min, max] with 1 <= min <= max, got {[lo, hi]}")
        return self


class Window(_Section):
    center: float
    width: float = Field(gt=0)


FRAMES: tuple[str, ...] = ("first", "middle", "max")


@dataclass(frozen=True)
class PreprocessSpec:
    """How DICOM pixels become the model input, as one value: what ``medops.dicom.pixels`` takes,
    and what ingest, the DICOM ensemble's preprocessing model and the client all pass on whole, so
    the served model sees an image prepared exactly as training's were.

    From params.yaml it is ``IngestConfig.preprocessing`` (the keys ``ingest.image_size``,
    ``window``, ``frame``, ``pixel_spacing``).

    Attributes:
        image_size: S, the side of the (S, S) output.
        window: a fixed VOI window that overrides each file's own; None = the file's VOI LUT or
            window, else its min..max.
        frame: which frame of a multi-frame image: ``first``, ``middle``, or ``max`` (the
            maximum over frames).
        pixel_spacing: mm per output pixel: resample to it and centre on the S x S canvas (a
            fixed field of view); None = resize the whole image. A file without a pixel spacing
            is then refused.

    Raises:
        ValueError: a value out of range (image_size < 1, an unknown frame, a spacing <= 0).
    """

    image_size: int
    window: Window | None = None
    frame: Literal["first", "middle", "max"] = "middle"
    pixel_spacing: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or int(self.image_size) != self.image_size \
                or self.image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {self.image_size!r}")
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be first, middle or max, got {self.frame!r}")
        if self.pixel_spacing is not None and not (math.isfinite(self.pixel_spacing)
                                                   and self.pixel_spacing > 0):
            raise ValueError(f"pixel_spacing must be > 0 mm or None, got {self.pixel_spacing!r}")
        object.__setattr__(self, "image_size", int(self.image_size))
        if self.pixel_spacing is not None:
            object.__setattr__(self, "pixel_spacing", float(self.pixel_spacing))


class DeidConfig(_Section):
    key_env: str = "MEDOPS_DEID_KEY"
    retain_longitudinal: bool = False
    allow_burned_in: bool = False


class IngestConfig(_Section):
    # the hospital's export folder, relative to the project or absolute: read only, never
    # versioned (its files and names carry PHI); label manifests (*.csv) arrive in it too
    source: str = "data/export"
    # image_size, window, frame, pixel_spacing: ``preprocessing`` below, the PreprocessSpec that
    # pixels, the serving contract, its preprocessing model and the client take whole
    image_size: int = Field(default=28, ge=8, le=1024)
    window: Window | None = None
    frame: Literal["first", "middle", "max"] = "middle"  # which frame of a multi-frame image
    # mm per output pixel: resample to it and centre on the image_size canvas (a fixed field of
    # view); None = resize the whole image. Files without a pixel spacing are then quarantined.
    pixel_spacing: float | None = Field(default=None, gt=0)
    incremental: bool = True
    workers: int = Field(default=2, ge=1)
    # where the per-file work runs: None = a local process pool of ``workers`` processes; "local"
    # = a dask.distributed LocalCluster of ``workers`` processes that medops starts; a scheduler's
    # address ("tcp://host:8786") = an existing Dask cluster (its workers must see the source folder)
    cluster: str | None = Field(default=None, pattern=r"^(local|(tcp|tls|ucx|inproc)://\S+)$")
    shard_size: int = Field(default=2048, ge=1)
    # seconds one file may take in a worker process; past it the worker is stopped and the file
    # quarantined as ``timeout`` (a decoder stuck on a hostile file). None = no limit. Files
    # decoded in the main process (workers: 1, or an export of a single chunk) have no limit,
    # nor do Dask workers that run several tasks at once (the watchdog is one per process).
    file_timeout_s: float | None = Field(default=120, gt=0)
    deid: DeidConfig = DeidConfig()

    @property
    def preprocessing(self) -> PreprocessSpec:
        """image_size, window, frame and pixel_spacing as the one value preprocessing takes."""
        return PreprocessSpec(self.image_size, self.window, self.frame, self.pixel_spacing)


class QualityConfig(_Section):
    min_rows: int = Field(default=50, ge=1)
    max_label_null_fraction: float = Field(default=0.0, ge=0, le=1)
    pixel_mean_range: tuple[float, float] = (0.05, 0.95)
    pixel_std_min: float = 0.01
    allowed_sex: list[str] = ["M", "F", "O"]


class SplitConfig(_Section):
    use_manifest_split: bool = True
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    test_fraction: float = Field(default=0.15, gt=0, lt=1)
    seed: int = 42


class AugmentConfig(_Section):
    rotation: float = Field(default=0.03, ge=0, le=0.5)
    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "horizontal"
    zoom: float = Field(default=0.1, ge=0, lt=1)
    contrast: float = Field(default=0.1, ge=0, lt=1)
    noise: float = Field(default=0.0, ge=0, le=0.5)  # std of additive Gaussian noise, 0 = off


class TrainConfig(_Section):
    model: str = "simple_cnn"            # a name in the model registry (medops.models.MODELS)
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    # one entry per block/stage (resnet, vit: the last sets the width); each at least 1
    filters: list[Annotated[int, Field(ge=1)]] = Field(default=[32, 64, 128], min_length=1)
    dense_units: int = Field(default=128, ge=1)
    dropout: float = Field(default=0.3, ge=0, lt=1)
    seed: int = 42
    # a seed ensemble (medops.learn.ensemble): one member per seed, each calibrated on val, served
    # as one model (the mean of their logits, recalibrated on val); [] = one model, trained with seed
    ensemble_seeds: list[int] = Field(default=[])
    class_weight: Literal["none", "balanced"] = "none"
    early_stopping_patience: int = Field(default=0, ge=0)  # 0 = off
    restore_best: bool = True            # keep the weights of the best validation-AUC epoch
    lr_schedule: Literal["constant", "cosine"] = "constant"
    threshold_strategy: Literal["fixed", "youden", "youden_bootstrap", "sensitivity", "balanced"] = "youden"  # on val
    calibration: Literal["none", "platt"] = "none"  # platt: fitted on val, folded into the model
    target_sensitivity: float = Field(default=0.9, gt=0, le=1)
    # GPU and multi-machine paths (medops.learn.distribute): "auto" uses what the machine has
    strategy: Literal["auto", "default", "mirrored", "multi_worker"] = "auto"
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    xla: Literal["auto", "on", "off"] = "auto"
    # reproducible training (medops.learn.determinism): pinned oneDNN ISA, threads, op determinism
    deterministic: bool = True
    threads: int = Field(default=2, ge=1)  # the pinned intra-op thread count (deterministic only)

    @field_validator("model")
    @classmethod
    def _registered(cls, name: str) -> str:
        # the registry imports no TensorFlow; imported here because it imports this module
        from medops.models import MODELS

        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choices: {', '.join(sorted(MODELS))}")
        return name

    @field_validator("ensemble_seeds")
    @classmethod
    def _distinct_members(cls, seeds: list[int]) -> list[int]:
        if seeds and (len(seeds) < 2 or len(set(seeds)) != len(seeds)):
            raise ValueError(f"ensemble_seeds must be empty or two or more distinct seeds, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _balanced_needs_calibration(self) -> "TrainConfig":
        if self.threshold_strategy == "balanced" and self.calibration != "platt":
            raise ValueError("threshold_strategy 'balanced' needs calibration: platt (it is a point on "
                             "the calibrated probabilities)")
        return self


class EvaluateConfig(_Section):
    threshold: float = Field(default=0.5, gt=0, lt=1)
    use_train_threshold: bool = True     # the threshold chosen on val in training, if recorded
    bootstrap_samples: int = Field(default=1000, ge=1)
    calibration_bins: int = Field(default=10, ge=2)
    gradcam_samples: int = Field(default=8, ge=0)
    gradcam_layer: str | None = None


class GateConfig(_Section):
    min_auc: float = Field(default=0.90, ge=0, le=1)
    min_accuracy: float = Field(default=0.75, ge=0, le=1)
    min_sensitivity: float = Field(default=0.70, ge=0, le=1)
    min_specificity: float = Field(default=0.50, ge=0, le=1)
    # champion/challenger: the model now serving is evaluated on the same test data in the same
    # run; the candidate is promoted only if its AUC is not lower by more than this margin
    compare_with_serving: bool = True
    champion_margin: float = Field(default=0.01, ge=0, le=1)
    # the OOD detector's false-alarm rate on held-out val images may be off its target
    # (ood.false_alarm_rate) by at most this much
    ood_false_alarm_margin: float = Field(default=0.04, ge=0, le=1)
    # the evidence behind the decision threshold (medops.stages.gate.check_evidence); null = off
    max_ece: float | None = Field(default=None, ge=0, le=1)  # test ECE at most this
    max_threshold_interval: float | None = Field(default=None, ge=0, le=1)  # val bootstrap width
    # the INT8 model (quantize stage) is served instead of FP32 only within these changes against
    # FP32 on the test split, with its OOD guard agreeing, and if it is faster by this median
    # ratio in the side-by-side measurement (medops.stages.gate.judge_int8)
    int8_max_auc_change: float = Field(default=0.005, ge=0, le=1)
    int8_max_accuracy_change: float = Field(default=0.005, ge=0, le=1)  # 0.005 = 0.5 points
    int8_min_ood_agreement: float = Field(default=0.99, ge=0, le=1)  # in_distribution as FP32's
    int8_min_speedup: float = Field(default=1.1, gt=0)  # median FP32 time / INT8 time


class OodConfig(_Section):
    """The out-of-distribution guard (medops.learn.ood), fitted on the training split."""

    false_alarm_rate: float = Field(default=0.05, gt=0, lt=0.5)  # on in-distribution val images
    ae_filters: list[int] = Field(default=[16, 32], min_length=1)
    ae_epochs: int = Field(default=8, ge=1)
    ae_batch_size: int = Field(default=128, ge=1)
    ae_learning_rate: float = Field(default=1e-3, gt=0)
    covariance_shrinkage: float = Field(default=0.01, ge=0, le=1)
    seed: int = 42


class ExportConfig(_Section):
    opset: int = Field(default=17, ge=9)
    parity_atol: float = Field(default=1e-4, gt=0)
    ood_parity_atol: float = Field(default=1e-3, gt=0)  # |reference - onnx| of ood_score


class QuantizeConfig(_Section):
    """The optional INT8 model (medops.stages.quantize): onnxruntime static quantization (QDQ),
    calibrated on train images; the gate decides whether it is served (gate.int8_*)."""

    enabled: bool = False
    calibration_images: int = Field(default=256, ge=1)  # train images, a seeded sample
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True        # weights quantised per output channel (per tensor when false)
    seed: int = 0
    golden_atol: float = Field(default=1e-3, gt=0)  # served vs quantize-time INT8 probabilities
    # the side-by-side speed measurement: FP32 and INT8 interleaved, same batch, same threads
    bench_batch: int = Field(default=64, ge=1)
    bench_threads: int = Field(default=1, ge=1)  # the embedded server's classifier instance uses 1
    bench_repeats: int = Field(default=15, ge=3)  # interleaved pairs; the decision uses the median
    bench_runs: int = Field(default=5, ge=1)      # runs timed per repeat


class ReferenceConfig(_Section):
    """The drift reference (medops.stages.reference): train images sampled for its features."""

    max_images: int = Field(default=5000, ge=10)
    seed: int = 0


class MonitorConfig(_Section):
    """``medops monitor``: the last ``window`` served images against the reference."""

    window: int = Field(default=200, ge=2)
    min_records: int = Field(default=30, ge=2)     # fewer recorded answers: nothing to test
    alpha: float = Field(default=0.01, gt=0, lt=1)  # family-wise, Holm-corrected over all tests
    min_category_shift: float = Field(default=0.05, ge=0, le=1)  # header tests: total variation


class ServingConfig(_Section):
    model_name: str = "pneumonia_classifier"
    repository: str = ".medops/triton/repository"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = Field(default=64, ge=1)
    preferred_batch_sizes: list[int] = []
    max_queue_delay_us: int = Field(default=0, ge=0)
    startup_timeout_s: float = Field(default=90, gt=0)
    # the DICOM ensemble refuses larger inputs with a clear error instead of running out of memory
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=64 * 1024 * 1024, ge=64)
    # the model-repository API (load/unload) needs this key; unset -> <project>/.medops/secrets
    admin_key_env: str = "MEDOPS_TRITON_ADMIN_KEY"
    # production repository only (onnxruntime backend on GPUs): TensorRT execution accelerator in FP16
    tensorrt_fp16: bool = False
    # drift monitoring: the DICOM ensemble appends one record per image (header categories, image
    # statistics, the answer; no PHI) to <record_dir>/requests.jsonl, relative to the server's
    # state folder (.medops); rotated at record_max_mb, record_keep old files kept
    record: bool = True
    record_dir: str = "drift"
    record_max_mb: float = Field(default=64, gt=0)
    record_keep: int = Field(default=3, ge=0)
    # an answer whose image is out of distribution: flag (keep the label, say so) or withhold
    # (label null, with the reason)
    ood_action: Literal["flag", "withhold"] = "flag"
    # what `medops deploy`/`rollback` write: embedded (the classifier as a Python-backend model.py
    # running onnxruntime on the CPU: the wheel's tritonserver) or production (Triton's onnxruntime
    # backend on a GPU instance, warm-up, optional TensorRT FP16: deploy/model_repository/)
    flavor: Literal["embedded", "production"] = "embedded"
    # embedded server: instances of each Python-backend model (one onnxruntime thread each);
    # 0 = one per CPU core of the serving machine, so a dynamic batch never waits for a busy core
    instances: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _batch_sizes(self) -> "ServingConfig":
        # Triton refuses a model whose preferred batch size exceeds its max_batch_size
        too_big = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes {too_big} must lie in 1..max_batch_size "
                             f"({self.max_batch_size})")
        return self

    def record_path(self, state_dir: Path) -> Path:
        """The drift log folder: ``record_dir``, relative to the server's state folder."""
        p = Path(self.record_dir)
        return p if p.is_absolute() else Path(state_dir) / p

    def repository_path(self, root: Path) -> Path:
        p = Path(self.repository)
        return p if p.is_absolute() else root / p

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"


class PrefectConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 4200
    deployment_name: str = "medops-demo"
    # cron schedule of the ingest-studies deployment (e.g. "0 2 * * *"); None = no schedule (new
    # data versions still start training through the medops.dataset.versioned trigger)
    ingest_schedule: str | None = None
    # start training-pipeline when ingest-studies announces a new data version
    train_on_new_data: bool = True
    # cron schedule of the drift-monitor deployment (e.g. "0 * * * *"); None = no schedule
    monitor_schedule: str | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Params(_Section):
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    quality: QualityConfig = QualityConfig()
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    ood: OodConfig = OodConfig()
    export: ExportConfig = ExportConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    reference: ReferenceConfig = ReferenceConfig()
    monitor: MonitorConfig = MonitorConfig()
    serving: ServingConfig = ServingConfig()
    prefect: PrefectConfig = PrefectConfig()


def with_cluster(params: Params, cluster: str | None) -> Params:
    """``params`` with ``ingest.cluster`` set to ``cluster`` (``"none"``: the local pool; None:
    left as it is): what ``medops ingest --cluster`` and the ingest flow's parameter do.

    Raises:
        ConfigError: ``cluster`` is neither "none", "local" nor a scheduler address.
    """
    if cluster is None:
        return params
    try:
        ingest = IngestConfig.model_validate({**params.ingest.model_dump(),
                                              "cluster": None if cluster == "none" else cluster})
    except ValidationError as exc:
        raise ConfigError(f"cluster {cluster!r}: none, local or a Dask scheduler address "
                          f"(tcp://host:8786) ({exc.errors()[0]['msg']})") from exc
    return params.model_copy(update={"ingest": ingest})


def load_params(path: Path | str) -> Params:
    """Read and validate params.yaml; a bad key or value raises ConfigError naming it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"no params file at {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc


def update_params_file(path: Path | str, overrides: dict[str, dict[str, Any]]) -> Params:
    """Write ``{section: {key: value}}`` into params.yaml, keeping its comments, and validate it.

    Used when a flow run's parameters (edited in the Prefect UI) must be what DVC records in
    dvc.lock. Validates before writing, so an invalid override never reaches the file.
    """
    from ruamel.yaml import YAML  # ships with DVC; keeps comments and key order

    path = Path(path)
    ryaml = YAML()
    ryaml.preserve_quotes = True
    doc = ryaml.load(path.read_text()) or {}
    for section, values in overrides.items():
        if section not in Params.model_fields:
            raise ConfigError(f"unknown params section {section!r}")
        node = doc.setdefault(section, {})
        for key, value in values.items():
            node[key] = value
    buf = io.StringIO()
    ryaml.dump(doc, buf)
    text = buf.getvalue()
    try:
        params = Params.model_validate(yaml.safe_load(text))
    except ValidationError as exc:
        raise ConfigError(f"invalid override {overrides}: {exc}") from exc
    write_text(path, text)
    return params
