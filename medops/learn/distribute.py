"""distribute: where and how training runs: one device, every local GPU, or a cluster of workers,
with mixed precision and XLA where they pay off.

A run is described by a ``DistributionPlan``, decided by a pure function from the environment
(``TF_CONFIG``, the visible GPUs) and three choices, then carried out by ``make_strategy`` /
``apply_precision`` / ``fit_under_plan``:

- strategy ``auto``: ``multi_worker`` (tf.distribute.MultiWorkerMirroredStrategy) when TF_CONFIG
  names more than one worker; ``mirrored`` (tf.distribute.MirroredStrategy) when more than one GPU
  is visible; ``default`` (TensorFlow's default strategy, one device) otherwise. ``mirrored`` asked
  explicitly on a machine without GPUs mirrors over logical CPU devices: this is how the tests run
  the real MirroredStrategy code path (all-reduce, per-replica batches) on a CPU-only machine.
- mixed precision ``auto``: Keras' ``mixed_float16`` policy only when every visible GPU has compute
  capability >= 7.0 (Tensor Cores; on older GPUs float16 is slower, as the Keras mixed-precision
  guide says), never on CPU. ``on`` forces it (allowed on CPU, for tests; slow there).
- XLA ``auto``: ``jit_compile`` only with a GPU and one replica, which is Keras' own ``"auto"``
  rule (``Trainer._resolve_auto_jit_compile`` turns XLA off on CPU-only machines and under
  tf.distribute). ``on`` forces it.

Mixed precision and the model's output: under ``mixed_float16`` every layer computes in float16
unless told otherwise, so the final sigmoid would output float16 (probabilities rounded to ~3
decimal digits, 1 - 1e-4 rounding to 1.0, and a float16 output in the exported model and Triton
contract). The output layer must compute in float32: model builders should create it with
``dtype="float32"``, e.g. ``layers.Dense(1, activation="sigmoid", name="probability",
dtype="float32")`` (a no-op under the default float32 policy). ``fit_under_plan`` enforces it with
``ensure_float32_output``, which rebuilds a model whose output is not float32 with that one layer
in float32. Loss scaling needs nothing from the caller: Keras 3 ``compile`` wraps the optimizer in
a LossScaleOptimizer under ``mixed_float16`` (``auto_scale_loss=True``).

Batch size and the loss under a strategy: the dataset given to ``model.fit`` is batched with the
GLOBAL batch size; TensorFlow splits each global batch over the replicas and Keras divides each
replica's mean loss by the number of replicas, so with a global batch divisible by the replica
count one step is the same computation as one single-device step on the same batch (up to
floating-point summation order). ``scale_batch_size`` turns a per-replica batch into the global
one for callers that size batches per device. Multi-worker input is sharded by DATA (each worker
reads the same in-memory dataset and keeps its part of every global batch): there are no files to
shard by.

What matches and what does not: with the same seed and data, N replicas (one machine or several)
train the same model as one device up to float32 summation order (measured: 1e-7 after 24 steps,
with medops' seeded shuffling and augmentation, SGD or Adam, class weights). Dropout is the
exception: each replica draws its own masks, so with ``dropout > 0`` a distributed run is a
different, still seeded, random draw.

Multi-worker runs: every worker runs the same program with its own TF_CONFIG; the strategy must be
created before any other TensorFlow op (collective ops are configured at start-up), so call
``make_strategy`` first and pass it to ``fit_under_plan``. Only the chief (``is_chief``) writes
the model and results; the other workers train and exit.

TensorFlow and Keras are imported inside the functions: importing this module is cheap, and
``plan_distribution`` with ``gpus`` given never touches TensorFlow.

Params: ``train.strategy``, ``train.mixed_precision`` and ``train.xla`` (TrainConfig, each "auto" by
default), which ``medops.stages.train.plan_for`` passes to ``plan_distribution``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from medops.errors import ConfigError, DistributionError
from medops.models import OUTPUT_NAME

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import tensorflow as tf

StrategyKind = Literal["default", "mirrored", "multi_worker"]
STRATEGY_CHOICES = ("auto", "default", "mirrored", "multi_worker")
SWITCH_CHOICES = ("auto", "on", "off")
# Tensor Cores, which make float16 matmuls/convolutions faster, arrived with compute capability 7.0.
MIN_MIXED_PRECISION_CC = (7, 0)


class GpuInfo(BaseModel):
    """One visible GPU: its TensorFlow device name and compute capability (None: unknown)."""

    model_config = ConfigDict(frozen=True)

    name: str
    compute_capability: tuple[int, int] | None = None


class ClusterTask(BaseModel):
    """This process's place in a TF_CONFIG cluster."""

    model_config = ConfigDict(frozen=True)

    cluster: dict[str, list[str]]
    task_type: str
    task_index: int

    @property
    def worker_count(self) -> int:
        """Processes that train: chief and workers (a parameter server or evaluator does not)."""
        return len(self.cluster.get("chief", [])) + len(self.cluster.get("worker", []))

    @property
    def worker_index(self) -> int:
        """0 for the chief; workers follow it (their own index when there is no chief)."""
        offset = len(self.cluster.get("chief", [])) if self.task_type == "worker" else 0
        return offset + self.task_index


class DistributionPlan(BaseModel):
    """How one process trains: the strategy, its devices, precision and compilation, and why."""

    model_config = ConfigDict(frozen=True)

    strategy: StrategyKind
    devices: list[str]                  # this worker's replica devices, e.g. ["/gpu:0", "/gpu:1"]
    num_replicas: int = Field(ge=1)     # replicas in sync over all workers
    mixed_precision: bool
    xla: bool
    worker_index: int = 0
    worker_count: int = 1
    logical_cpus: int = 0               # > 0: split the CPU into this many logical devices first
    cluster: ClusterTask | None = None  # multi_worker only
    reasons: list[str]

    @property
    def policy(self) -> str:
        """The Keras dtype policy name this plan trains under."""
        return "mixed_float16" if self.mixed_precision else "float32"


def parse_tf_config(raw: str | None) -> ClusterTask | None:
    """TF_CONFIG's cluster and task, or None when it is unset or empty.

    Raises:
        ConfigError: not JSON, no cluster or task, a task type not in the cluster, or a task index
            out of range.
    """
    if raw is None or not raw.strip():
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"TF_CONFIG must be a JSON object, got {type(data).__name__}")
    cluster, task = data.get("cluster"), data.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError("TF_CONFIG has no 'cluster' object")
    if not isinstance(task, dict) or "type" not in task:
        raise ConfigError("TF_CONFIG has no 'task' object with a 'type'")
    try:
        parsed = ClusterTask(
            cluster={str(k): [str(a) for a in v] for k, v in cluster.items()},
            task_type=str(task["type"]),
            task_index=int(task.get("index", 0)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"TF_CONFIG cluster/task malformed: {exc}") from exc
    members = parsed.cluster.get(parsed.task_type)
    if not members:
        raise ConfigError(
            f"TF_CONFIG task type {parsed.task_type!r} is not in the cluster ({sorted(parsed.cluster)})"
        )
    if not 0 <= parsed.task_index < len(members):
        raise ConfigError(
            f"TF_CONFIG task index {parsed.task_index} is out of range for "
            f"{len(members)} {parsed.task_type!r} task(s)"
        )
    return parsed


def detect_gpus(env: Mapping[str, str] | None = None) -> list[GpuInfo]:
    """The GPUs TensorFlow can see, with their compute capability.

    ``CUDA_VISIBLE_DEVICES`` set to "" or "-1" answers "none" without importing TensorFlow.
    Otherwise this imports TensorFlow and lists physical devices, which does not initialise them
    (logical devices can still be configured afterwards).
    """
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return []
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        cc = details.get("compute_capability")
        gpus.append(GpuInfo(name=device.name, compute_capability=tuple(cc) if cc else None))
    return gpus


def _choose_switch(name: str, value: str | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in SWITCH_CHOICES:
        raise ConfigError(f"{name} must be one of {SWITCH_CHOICES}, got {value!r}")
    return value


def plan_distribution(
    *,
    strategy: str = "auto",
    mixed_precision: str | bool = "auto",
    xla: str | bool = "auto",
    env: Mapping[str, str] | None = None,
    gpus: Sequence[GpuInfo] | None = None,
    cpu_replicas: int = 2,
) -> DistributionPlan:
    """Decide the strategy, devices, precision and XLA for this process.

    Args:
        strategy: auto | default | mirrored | multi_worker (see the module docstring).
        mixed_precision: auto | on | off (or a bool).
        xla: auto | on | off (or a bool).
        env: where TF_CONFIG and CUDA_VISIBLE_DEVICES are read (default: os.environ).
        gpus: the visible GPUs; None detects them (``detect_gpus``, imports TensorFlow unless
            CUDA_VISIBLE_DEVICES hides every GPU).
        cpu_replicas: logical CPU devices for ``mirrored`` on a machine without GPUs.

    Raises:
        ConfigError: an unknown choice, a malformed TF_CONFIG, ``multi_worker`` without a cluster
            in TF_CONFIG, or a one-machine strategy asked for while TF_CONFIG names several workers
            (each worker would train alone and write its own model).
    """
    env = os.environ if env is None else env
    if strategy not in STRATEGY_CHOICES:
        raise ConfigError(f"strategy must be one of {STRATEGY_CHOICES}, got {strategy!r}")
    mp_choice = _choose_switch("mixed_precision", mixed_precision)
    xla_choice = _choose_switch("xla", xla)
    if cpu_replicas < 1:
        raise ConfigError(f"cpu_replicas must be >= 1, got {cpu_replicas}")
    task = parse_tf_config(env.get("TF_CONFIG"))
    gpu_list = list(detect_gpus(env) if gpus is None else gpus)
    n_workers = task.worker_count if task is not None else 1

    kind, why_strategy = _decide_strategy(strategy, task, n_workers, len(gpu_list))
    devices, logical_cpus, why_devices = _decide_devices(kind, len(gpu_list), cpu_replicas)
    multi_worker = kind == "multi_worker"
    num_replicas = len(devices) * (n_workers if multi_worker else 1)
    reasons = [why_strategy, *why_devices]
    if multi_worker:
        reasons.append(
            f"multi_worker: {n_workers} workers x {len(devices)} local replica(s), "
            "assuming every worker has this worker's devices"
        )
    use_mp, why_mp = _decide_mixed_precision(mp_choice, gpu_list)
    use_xla, why_xla = _decide_xla(xla_choice, gpu_list, num_replicas)

    return DistributionPlan(
        strategy=kind,
        devices=devices,
        num_replicas=num_replicas,
        mixed_precision=use_mp,
        xla=use_xla,
        worker_index=task.worker_index if (task is not None and multi_worker) else 0,
        worker_count=n_workers if multi_worker else 1,
        logical_cpus=logical_cpus,
        cluster=task if multi_worker else None,
        reasons=[*reasons, why_mp, why_xla],
    )


def _decide_strategy(strategy: str, task: ClusterTask | None, n_workers: int,
                     n_gpus: int) -> tuple[StrategyKind, str]:
    """The strategy kind for the ``strategy`` choice, and why; raises ConfigError for a choice the
    cluster in TF_CONFIG contradicts (see ``plan_distribution``)."""
    kind: StrategyKind
    if strategy == "auto":
        if n_workers > 1:
            kind, reason = "multi_worker", f"auto: TF_CONFIG names {n_workers} workers"
        elif n_gpus > 1:
            kind, reason = "mirrored", f"auto: {n_gpus} GPUs visible"
        else:
            kind, reason = "default", f"auto: one worker and {n_gpus} GPU(s) visible"
    else:
        kind = strategy  # type: ignore[assignment]
        reason = f"strategy {strategy!r} asked explicitly"
        if kind == "multi_worker" and (task is None or n_workers < 1):
            raise ConfigError("strategy 'multi_worker' needs TF_CONFIG naming the cluster and this task")
        if kind != "multi_worker" and n_workers > 1:
            raise ConfigError(
                f"TF_CONFIG names {n_workers} workers but strategy {strategy!r} trains on one "
                "machine; use 'multi_worker' or 'auto'"
            )

    if kind == "multi_worker" and task is not None and task.task_type not in ("chief", "worker"):
        raise ConfigError(
            f"TF_CONFIG task type {task.task_type!r} does not train under multi_worker (chief or worker)"
        )
    return kind, reason


def _decide_devices(kind: StrategyKind, n_gpus: int, cpu_replicas: int) -> tuple[list[str], int, list[str]]:
    """This worker's replica devices, the logical CPU devices to configure first (0: none), and why
    (a reason only when the CPU is split)."""
    logical_cpus = 0
    reasons: list[str] = []
    if n_gpus:
        devices = [f"/gpu:{i}" for i in range(n_gpus)]
    elif kind == "mirrored":
        logical_cpus = cpu_replicas
        devices = [f"/cpu:{i}" for i in range(cpu_replicas)]
        reasons.append(f"no GPU: mirrored over {cpu_replicas} logical CPU devices")
    else:
        devices = ["/cpu:0"]
    if kind == "default":
        devices = devices[:1]
    return devices, logical_cpus, reasons


def _decide_mixed_precision(choice: str, gpus: Sequence[GpuInfo]) -> tuple[bool, str]:
    """Mixed precision on or off for the ``mixed_precision`` switch, and why: ``auto`` only when
    every GPU has Tensor Cores."""
    if choice != "auto":
        return choice == "on", f"mixed precision {choice} (asked explicitly)"
    if not gpus:
        return False, "mixed precision off: no GPU (float16 on CPU is emulated and slower)"
    old = [g for g in gpus if g.compute_capability is None or g.compute_capability < MIN_MIXED_PRECISION_CC]
    if old:
        return False, (
            f"mixed precision off: {old[0].name} compute capability {old[0].compute_capability} "
            f"is below {MIN_MIXED_PRECISION_CC} or unknown (no Tensor Cores)"
        )
    return True, "mixed precision on: every GPU has Tensor Cores"


def _decide_xla(choice: str, gpus: Sequence[GpuInfo], num_replicas: int) -> tuple[bool, str]:
    """XLA on or off for the ``xla`` switch, and why: ``auto`` follows Keras' rule (a GPU, one
    replica)."""
    if choice != "auto":
        return choice == "on", f"XLA {choice} (asked explicitly)"
    if not gpus:
        return False, "XLA off: no GPU (Keras' auto rule)"
    if num_replicas > 1:
        return False, "XLA off: Keras does not auto-enable XLA under tf.distribute; xla='on' forces it"
    return True, "XLA on: one GPU"


def is_chief(plan: DistributionPlan) -> bool:
    """True for the one process that writes the model and results: the only process of a
    one-machine run, or the chief of a cluster (worker 0 when TF_CONFIG has no chief task)."""
    return plan.worker_index == 0


def scale_batch_size(batch_size: int, plan: DistributionPlan) -> int:
    """The global batch size for ``batch_size`` examples per replica."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size * plan.num_replicas


def check_global_batch(global_batch_size: int, plan: DistributionPlan) -> None:
    """Raise ConfigError for a global batch below 1; warn when it does not split evenly over the
    replicas (legal, but each replica averages its own share, so their examples weigh unequally
    and the step is no longer the single-device one)."""
    if global_batch_size < 1:
        raise ConfigError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % plan.num_replicas:
        warnings.warn(
            f"global batch {global_batch_size} does not split evenly over {plan.num_replicas} "
            "replicas: their examples weigh unequally in the averaged gradient",
            stacklevel=3,
        )


def configure_logical_cpus(count: int) -> None:
    """Split the first physical CPU into ``count`` logical devices (/cpu:0 ... /cpu:count-1).

    Raises:
        DistributionError: TensorFlow already initialised its devices with fewer logical CPUs
            (this must run before the first op; in tests, in a fresh process).
    """
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as exc:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < count:
            raise DistributionError(
                f"mirrored over {count} logical CPU devices needs them configured before TensorFlow "
                f"initialises its devices; it already has {have}: {exc}"
            ) from exc


def make_strategy(plan: DistributionPlan) -> "tf.distribute.Strategy":
    """The tf.distribute strategy for ``plan``.

    For ``multi_worker`` call this before any other TensorFlow op in the process. The cluster comes
    from the plan (not re-read from the environment), and the strategy's replica count is checked
    against the plan's.

    Raises:
        DistributionError: logical devices cannot be configured any more, or the strategy has a
            different number of replicas than the plan.
    """
    import tensorflow as tf

    if plan.strategy == "default":
        strategy = tf.distribute.get_strategy()
    elif plan.strategy == "mirrored":
        if plan.logical_cpus:
            configure_logical_cpus(plan.logical_cpus)
        strategy = tf.distribute.MirroredStrategy(devices=list(plan.devices))
    else:
        assert plan.cluster is not None
        n_gpus = sum(d.startswith("/gpu") for d in plan.devices)
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(plan.cluster.cluster),
            task_type=plan.cluster.task_type,
            task_id=plan.cluster.task_index,
            rpc_layer="grpc",
            # SimpleClusterResolver reports no accelerators unless told; MWMS uses this count.
            num_accelerators={"GPU": n_gpus} if n_gpus else None,
        )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver,
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
            ),
        )
        if strategy.extended._in_multi_worker_mode():  # noqa: SLF001 - as Keras itself checks
            fix_multi_worker_reduce(strategy)
    if strategy.num_replicas_in_sync != plan.num_replicas:
        raise DistributionError(
            f"{plan.strategy} strategy has {strategy.num_replicas_in_sync} replicas in sync, "
            f"the plan expects {plan.num_replicas} (devices {plan.devices}, {plan.worker_count} worker(s))"
        )
    return strategy


def fix_multi_worker_reduce(strategy: "tf.distribute.Strategy") -> None:
    """Make ``strategy.reduce`` (this instance only) accept the two calls Keras 3's ``model.fit``
    makes that a multi-worker MultiWorkerMirroredStrategy refuses (keras-team/keras#20585,
    tensorflow/tensorflow#72388: ``fit`` fails before the first step on a cluster of two or more):

    - ``reduce("MEAN", (x, y), axis=None)`` on the first input batch, to learn its shapes
      (``Trainer._maybe_symbolic_build``): MWMS's cross-device reduce takes one PerReplica value,
      not a nest. Each leaf is reduced on its own.
    - ``reduce("MEAN", loss, axis=0)`` on every logged scalar (``reduce_per_replica``): a scalar has
      no axis 0. Scalars are averaged over replicas (``axis=None``), which is what ``axis=0`` means
      on one-replica-per-worker batches.

    Every other call goes to the strategy's own ``reduce`` unchanged; one-worker strategies do not
    need this (their reduce takes nests and Keras reduces their logs locally).
    """
    import tensorflow as tf

    original = strategy.reduce

    def reduce(reduce_op: Any, value: Any, axis: int | None = None) -> Any:
        if axis is None and isinstance(value, (tuple, list, dict)):
            return tf.nest.map_structure(lambda v: original(reduce_op, v, axis=None), value)
        if axis is not None:
            local = strategy.experimental_local_results(value)
            if local and getattr(local[0], "shape", None) is not None and local[0].shape.rank == 0:
                axis = None
        return original(reduce_op, value, axis=axis)

    strategy.reduce = reduce  # type: ignore[method-assign]


def apply_precision(plan: DistributionPlan) -> str:
    """Set Keras' global dtype policy for ``plan``; returns the previous policy's name, for
    ``restore_precision``. Models built afterwards use it; models already built keep theirs."""
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(plan.policy)
    return previous


def restore_precision(previous: str = "float32") -> None:
    """Set Keras' global dtype policy back (to what ``apply_precision`` returned)."""
    import keras

    keras.mixed_precision.set_global_policy(previous)


@contextlib.contextmanager
def precision(plan: DistributionPlan) -> Iterator[str]:
    """``with precision(plan):`` builds models under the plan's policy and restores the old one."""
    previous = apply_precision(plan)
    try:
        yield plan.policy
    finally:
        restore_precision(previous)


def ensure_float32_output(model: "keras.Model") -> "keras.Model":
    """``model`` if its output is float32; otherwise a copy whose output layer (``probability``, or
    the last layer) computes in float32, so a mixed-precision model still outputs float32
    probabilities. The copy shares every other layer (and its weights) with ``model``; the output
    layer is rebuilt with fresh weights, so call this before training.
    """
    import keras

    if model.outputs[0].dtype == "float32":
        return model
    names = [layer.name for layer in model.layers]
    target = OUTPUT_NAME if OUTPUT_NAME in names else model.layers[-1].name

    def clone(layer: "keras.layers.Layer") -> "keras.layers.Layer":
        if layer.name != target:
            return layer
        config = layer.get_config()
        config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    fixed = keras.models.clone_model(model, clone_function=clone)
    if fixed.outputs[0].dtype != "float32":
        raise DistributionError(
            f"model {model.name} still outputs {fixed.outputs[0].dtype} after making layer {target!r} "
            "float32; build its output layer with dtype='float32'"
        )
    return fixed


def shard_by_data(dataset: "tf.data.Dataset") -> "tf.data.Dataset":
    """``dataset`` with auto-sharding by DATA: in-memory datasets have no files to shard by, and
    TensorFlow's default (FILE, falling back to DATA with a warning) would say so every run."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


@dataclass
class FitOutcome:
    """What ``fit_under_plan`` returns: the trained model (its variables belong to the strategy),
    the per-epoch history, and the plan it ran under."""

    model: Any
    history: dict[str, list[float]]
    plan: DistributionPlan


def fit_under_plan(
    plan: DistributionPlan,
    build_model_fn: Callable[[], "keras.Model"],
    dataset_fn: Callable[[int], "tf.data.Dataset"],
    *,
    compile_fn: Callable[["keras.Model"], Any],
    global_batch_size: int,
    epochs: int,
    seed: int,
    validation_fn: Callable[[int], "tf.data.Dataset"] | None = None,
    callbacks: Sequence[Any] = (),
    class_weight: dict[int, float] | None = None,
    strategy: "tf.distribute.Strategy | None" = None,
    backup: Any = None,
) -> FitOutcome:
    """Build, compile and fit a model under ``plan``.

    Seeds Python, NumPy and TensorFlow (keras.utils.set_random_seed), sets the plan's dtype policy
    for the build (and restores the previous one afterwards), builds and compiles inside the
    strategy scope (so variables and optimizer slots are mirrored), sets ``jit_compile`` to the
    plan's XLA choice, and fits on ``dataset_fn(global_batch_size)`` sharded by DATA.

    Args:
        plan: from ``plan_distribution``.
        build_model_fn: returns an uncompiled keras.Model; called inside the strategy scope.
        dataset_fn: ``global_batch_size -> tf.data.Dataset`` of (image, label) batches of the
            global size. Keep it divisible by ``plan.num_replicas`` (warned otherwise): an uneven
            split weighs the replicas' examples unequally, as does a short last batch.
        global_batch_size: examples per step over all replicas (see ``scale_batch_size``).
        compile_fn: compiles the model it is given (called inside the scope; its return value
            is ignored), e.g. ``lambda m: medops.stages.train.compile_model(m, cfg)``.
        epochs, seed: as in TrainConfig.
        validation_fn: like ``dataset_fn``, for validation data (optional).
        callbacks, class_weight: passed to ``model.fit``.
        strategy: a strategy already made from ``plan`` (required in multi-worker processes, which
            must create it first); default ``make_strategy(plan)``.
        backup: a ``medops.learn.resume.training_backup`` callback (run last): a run killed after
            some epochs resumes after them, replaying the training data's per-epoch shuffles, and
            the history returned holds every epoch.
    """
    import keras
    import tensorflow as tf

    check_global_batch(global_batch_size, plan)
    strategy = make_strategy(plan) if strategy is None else strategy
    previous = apply_precision(plan)
    try:
        keras.utils.set_random_seed(seed)
        with strategy.scope():
            distributed = tf.distribute.has_strategy()  # False for TensorFlow's default strategy
            model = build_model_fn()
            if plan.mixed_precision:
                model = ensure_float32_output(model)
            compile_fn(model)
            # after compile: compile's own "auto" would decide by Keras' rule, the plan already did
            model.jit_compile = plan.xla
        train_ds = shard_by_data(dataset_fn(global_batch_size))
        val_ds = shard_by_data(validation_fn(global_batch_size)) if validation_fn is not None else None
        if not distributed:
            # Under a tf.distribute strategy Keras' fit opens one iterator on the training data
            # before the first epoch (Trainer._maybe_symbolic_build, to learn the input shapes), so
            # a dataset reshuffled on every iteration starts training from its second shuffle.
            # Opening one here too gives one device the same shuffles and augmentation draws as
            # any number of replicas.
            iter(train_ds)
        for _ in range(backup.iterators_to_replay if backup is not None else 0):
            iter(train_ds)  # resuming: the epochs already run drew these shuffles
        fit = model.fit(
            train_ds, validation_data=val_ds, epochs=epochs, verbose=0, shuffle=False,
            callbacks=[*callbacks, *([backup] if backup is not None else [])], class_weight=class_weight,
        )
    finally:
        restore_precision(previous)
    history = {k: [float(v) for v in vals] for k, vals in (backup.history if backup is not None
                                                            else fit.history).items()}
    return FitOutcome(model=model, history=history, plan=plan)
