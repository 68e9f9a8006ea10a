"""Typed configuration: one pydantic model per params.yaml section.

``extra="forbid"`` everywhere, so a typo in params.yaml (or in a Prefect UI form, which these same
models type) fails at load time with the key's name. This module imports neither TensorFlow nor
Prefect.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class DeidConfig(_Section):
    key_env: str = "MEDOPS_DEID_KEY"
    retain_longitudinal: bool = False
    allow_burned_in: bool = False


class IngestConfig(_Section):
    # the hospital's export folder, relative to the project or absolute: read only, never
    # versioned (its files and names carry PHI); label manifests (*.csv) arrive in it too
    source: str = "data/export"
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
    # the evidence behind the decision threshold (medops.stages.gate.check_evidence); null = off
    max_ece: float | None = Field(default=None, ge=0, le=1)  # test ECE at most this
    max_threshold_interval: float | None = Field(default=None, ge=0, le=1)  # val bootstrap width


class ExportConfig(_Section):
    opset: int = Field(default=17, ge=9)
    parity_atol: float = Field(default=1e-4, gt=0)


class ServingConfig(_Section):
    model_name: str = "pneumonia_classifier"
    repository: str = ".medops/triton/repository"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = Field(default=64, ge=1)
    preferred_batch_sizes: list[int] = [16, 32, 64]
    max_queue_delay_us: int = Field(default=1000, ge=0)
    startup_timeout_s: float = Field(default=90, gt=0)
    # the DICOM ensemble refuses larger inputs with a clear error instead of running out of memory
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=64 * 1024 * 1024, ge=64)
    # the model-repository API (load/unload) needs this key; unset -> <project>/.medops/secrets
    admin_key_env: str = "MEDOPS_TRITON_ADMIN_KEY"
    # production repository only (onnxruntime backend on GPUs): TensorRT execution accelerator in FP16
    tensorrt_fp16: bool = False

    @model_validator(mode="after")
    def _batch_sizes(self) -> "ServingConfig":
        # Triton refuses a model whose preferred batch size exceeds its max_batch_size
        too_big = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes {too_big} must lie in 1..max_batch_size "
                             f"({self.max_batch_size})")
        return self

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
    export: ExportConfig = ExportConfig()
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
    path.write_text(text)
    return params
