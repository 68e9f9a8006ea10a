"""medops.learn.distribute: plan decisions from TF_CONFIG and GPUs, the mixed-precision policy and the
float32 output, and MirroredStrategy over two logical CPU devices matching single-device training.

Training comparisons run tests/integration/_multiworker_worker.py in fresh interpreters: logical
CPU devices can only be configured before TensorFlow initialises its devices, which this pytest
process may already have done.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from medops.learn import distribute
from medops.learn.distribute import GpuInfo, is_chief, plan_distribution, scale_batch_size
from medops.errors import ConfigError, DistributionError

REPO = Path(__file__).resolve().parents[2]


def load_worker_module():
    """tests/integration/_multiworker_worker.py (the worker and its launch/compare helpers)."""
    path = REPO / "tests" / "integration" / "_multiworker_worker.py"
    spec = importlib.util.spec_from_file_location("_multiworker_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


workers = load_worker_module()
A100 = GpuInfo(name="/physical_device:GPU:0", compute_capability=(8, 0))
P100 = GpuInfo(name="/physical_device:GPU:0", compute_capability=(6, 0))


def tf_config(cluster: dict, task_type: str, index: int) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}


TWO_WORKERS = {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}


# ---------------------------------------------------------------- plan decisions (pure)

def test_two_workers_in_tf_config_plan_multi_worker_and_only_worker_0_is_chief():
    plans = [plan_distribution(env=tf_config(TWO_WORKERS, "worker", i), gpus=[]) for i in (0, 1)]
    for i, plan in enumerate(plans):
        assert plan.strategy == "multi_worker"
        assert plan.worker_count == 2 and plan.worker_index == i
        assert plan.num_replicas == 2 and plan.devices == ["/cpu:0"]
        assert not plan.mixed_precision and not plan.xla
    assert [is_chief(p) for p in plans] == [True, False]


def test_a_chief_task_is_worker_0_and_workers_follow_it():
    cluster = {"chief": ["c:1"], "worker": ["w0:1", "w1:1"]}
    chief = plan_distribution(env=tf_config(cluster, "chief", 0), gpus=[])
    worker0 = plan_distribution(env=tf_config(cluster, "worker", 0), gpus=[])
    assert (chief.worker_count, chief.worker_index, is_chief(chief)) == (3, 0, True)
    assert (worker0.worker_index, is_chief(worker0)) == (1, False)
    assert worker0.num_replicas == 3


def test_replicas_over_a_cluster_count_every_workers_gpus():
    plan = plan_distribution(env=tf_config(TWO_WORKERS, "worker", 1), gpus=[A100, A100])
    assert plan.strategy == "multi_worker"
    assert plan.devices == ["/gpu:0", "/gpu:1"] and plan.num_replicas == 4
    assert plan.mixed_precision
    assert not plan.xla  # Keras' auto rule: no XLA under tf.distribute
    assert scale_batch_size(32, plan) == 128


def test_no_gpu_auto_is_one_device_without_mixed_precision_or_xla():
    plan = plan_distribution(env={}, gpus=[])
    assert plan.strategy == "default" and plan.devices == ["/cpu:0"] and plan.num_replicas == 1
    assert not plan.mixed_precision and not plan.xla
    assert plan.policy == "float32"
    assert any("no GPU" in r for r in plan.reasons)
    assert is_chief(plan) and scale_batch_size(64, plan) == 64


def test_gpus_under_auto():
    one = plan_distribution(env={}, gpus=[A100])
    assert (one.strategy, one.devices, one.mixed_precision, one.xla) == ("default", ["/gpu:0"], True, True)
    assert one.policy == "mixed_float16"
    two = plan_distribution(env={}, gpus=[A100, A100])
    assert (two.strategy, two.num_replicas, two.mixed_precision, two.xla) == ("mirrored", 2, True, False)
    # no Tensor Cores: float16 would be slower, so auto keeps float32; XLA still pays off
    old = plan_distribution(env={}, gpus=[P100])
    assert (old.mixed_precision, old.xla) == (False, True)
    assert any("compute capability" in r for r in old.reasons)
    unknown = plan_distribution(env={}, gpus=[GpuInfo(name="gpu")])
    assert not unknown.mixed_precision


def test_explicit_mirrored_without_gpu_uses_logical_cpu_devices():
    plan = plan_distribution(strategy="mirrored", env={}, gpus=[])
    assert plan.strategy == "mirrored"
    assert plan.devices == ["/cpu:0", "/cpu:1"] and plan.logical_cpus == 2 and plan.num_replicas == 2
    assert not plan.mixed_precision and not plan.xla
    assert scale_batch_size(16, plan) == 32
    four = plan_distribution(strategy="mirrored", env={}, gpus=[], cpu_replicas=4)
    assert four.num_replicas == 4 and four.devices[-1] == "/cpu:3"


def test_explicit_switches_override_auto_on_cpu():
    plan = plan_distribution(mixed_precision="on", xla=True, env={}, gpus=[])
    assert plan.mixed_precision and plan.xla and plan.policy == "mixed_float16"
    off = plan_distribution(mixed_precision="off", xla="off", env={}, gpus=[A100])
    assert not off.mixed_precision and not off.xla
    explicit_default = plan_distribution(strategy="default", env={}, gpus=[A100, A100])
    assert explicit_default.devices == ["/gpu:0"] and explicit_default.num_replicas == 1


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        ({"strategy": "tpu"}, {}, "strategy must be one of"),
        ({"mixed_precision": "yes"}, {}, "mixed_precision must be one of"),
        ({"xla": "maybe"}, {}, "xla must be one of"),
        ({"strategy": "multi_worker"}, {}, "needs TF_CONFIG"),
        ({"strategy": "mirrored"}, tf_config(TWO_WORKERS, "worker", 0), "names 2 workers"),
        ({"strategy": "default"}, tf_config(TWO_WORKERS, "worker", 0), "names 2 workers"),
        ({}, {"TF_CONFIG": "{not json"}, "not valid JSON"),
        ({}, {"TF_CONFIG": json.dumps({"task": {"type": "worker"}})}, "no 'cluster'"),
        ({}, tf_config(TWO_WORKERS, "worker", 2), "index 2 is out of range"),
        ({}, tf_config(TWO_WORKERS, "chief", 0), "not in the cluster"),
        ({}, tf_config({**TWO_WORKERS, "ps": ["p:1"]}, "ps", 0), "does not train"),
    ],
)
def test_bad_choices_and_tf_config_are_config_errors(kwargs, env, message):
    with pytest.raises(ConfigError, match=message):
        plan_distribution(env=env, gpus=[], **kwargs)


def test_hidden_gpus_are_decided_without_importing_tensorflow():
    code = (
        "import sys\n"
        "from medops.learn.distribute import plan_distribution\n"
        "plan = plan_distribution(env={'CUDA_VISIBLE_DEVICES': '-1'})\n"
        "assert plan.strategy == 'default' and not plan.mixed_precision and not plan.xla, plan\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


# ---------------------------------------------------------------- precision (in process)

def test_mixed_float16_plan_on_cpu_keeps_the_output_float32_and_restores_the_policy():
    import keras

    from medops.config import TrainConfig
    from medops.models import OUTPUT_NAME, build_model

    plan = plan_distribution(mixed_precision="on", env={}, gpus=[])
    cfg = TrainConfig(filters=[4], dense_units=4, dropout=0.0)
    with distribute.precision(plan):
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        model = distribute.ensure_float32_output(build_model("simple_cnn", cfg, (28, 28, 1)))
    assert keras.mixed_precision.global_policy().name == "float32"
    assert model.get_layer("conv1").compute_dtype == "float16"    # the policy did apply
    assert model.get_layer(OUTPUT_NAME).compute_dtype == "float32"
    assert model.outputs[0].dtype == "float32"
    scores = model.predict(np.full((2, 28, 28, 1), 0.5, np.float32), verbose=0)
    assert scores.dtype == np.float32 and np.all((scores > 0) & (scores < 1))
    # a float32 model is returned as it is
    plain = build_model("simple_cnn", cfg, (28, 28, 1))
    assert distribute.ensure_float32_output(plain) is plain


def test_fit_under_a_mixed_precision_plan_scales_the_loss_and_outputs_float32():
    import keras
    import tensorflow as tf

    from medops.config import TrainConfig
    from medops.models import build_model
    from medops.paths import BUNDLED_DATASET

    with np.load(BUNDLED_DATASET) as data:
        x = (data["train_images"][:64].astype(np.float32) / 255.0)[..., None]
        y = data["train_labels"][:64].astype(np.float32)
    from medops.stages.train import compile_model

    plan = plan_distribution(mixed_precision="on", env={}, gpus=[])
    cfg = TrainConfig(filters=[4], dense_units=4, dropout=0.0)
    previous = keras.mixed_precision.global_policy().name
    outcome = distribute.fit_under_plan(
        plan,
        lambda: build_model("simple_cnn", cfg, (28, 28, 1)),
        lambda b: tf.data.Dataset.from_tensor_slices((x, y.reshape(-1, 1))).batch(b),
        compile_fn=lambda model: compile_model(model, cfg), global_batch_size=32, epochs=1, seed=3,
    )
    assert keras.mixed_precision.global_policy().name == previous
    assert outcome.model.outputs[0].dtype == "float32"
    assert isinstance(outcome.model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(outcome.history["loss"]).all() and len(outcome.history["loss"]) == 1
    assert outcome.model.predict(x[:4], verbose=0).dtype == np.float32


def test_fit_under_an_explicit_xla_plan_compiles_with_xla():
    import tensorflow as tf

    from medops.config import TrainConfig
    from medops.models import build_model

    x = np.random.default_rng(0).random((32, 28, 28, 1), dtype=np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.float32).reshape(-1, 1)
    from medops.stages.train import compile_model

    plan = plan_distribution(xla="on", env={}, gpus=[])
    cfg = TrainConfig(filters=[4], dense_units=4, dropout=0.0)
    outcome = distribute.fit_under_plan(
        plan,
        lambda: build_model("simple_cnn", cfg, (28, 28, 1)),
        lambda b: tf.data.Dataset.from_tensor_slices((x, y)).batch(b),
        compile_fn=lambda model: compile_model(model, cfg), global_batch_size=16, epochs=1, seed=3,
    )
    assert outcome.model.jit_compile is True
    assert np.isfinite(outcome.history["loss"]).all()


def test_global_batch_checks():
    mirrored = plan_distribution(strategy="mirrored", env={}, gpus=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distribute.check_global_batch(32, mirrored)
    with pytest.warns(UserWarning, match="33 does not split evenly over 2 replicas"):
        distribute.check_global_batch(33, mirrored)
    with pytest.raises(ConfigError, match="global_batch_size must be >= 1, got 0"):
        distribute.check_global_batch(0, mirrored)


def test_the_single_device_comparison_fails_on_a_difference_or_an_untrained_model(tmp_path):
    """The comparison the training tests rely on can fail: one weight off by 10 x ATOL, or a
    "trained" model that never moved from its initial weights."""
    rng = np.random.default_rng(1)
    initial = {"i0": rng.normal(size=(3, 3)).astype(np.float32), "i1": np.zeros(3, np.float32)}
    trained = {"w0": initial["i0"] + 0.1, "w1": initial["i1"] - 0.1}
    probe = rng.random((8, 1)).astype(np.float32)
    info = {"history": {"loss": [0.7, 0.5]}}

    def write(name, weights, probe_values):
        folder = tmp_path / name
        folder.mkdir()
        np.savez(folder / "result.npz", probe=probe_values, **weights, **initial)
        (folder / "result.json").write_text(json.dumps(info))
        return folder

    reference = write("reference", trained, probe)
    assert workers.assert_matches_single_device(reference, write("same", trained, probe + workers.ATOL / 10))
    off = {**trained, "w1": trained["w1"] + np.array([0, 10 * workers.ATOL, 0], np.float32)}
    with pytest.raises(AssertionError, match="trained w1"):
        workers.assert_matches_single_device(reference, write("off", off, probe))
    untrained = {"w0": initial["i0"], "w1": initial["i1"]}
    with pytest.raises(AssertionError, match="moved the weights by only"):
        workers.assert_matches_single_device(write("untrained", untrained, probe), write("u2", untrained, probe))


def test_logical_cpus_after_tensorflow_started_are_a_distribution_error():
    import tensorflow as tf

    tf.constant(1.0)  # initialises the devices of this process, as any earlier test may have
    if len(tf.config.list_logical_devices("CPU")) >= 8:
        pytest.skip("this process already has 8 logical CPU devices")
    with pytest.raises(DistributionError, match="before TensorFlow initialises"):
        distribute.configure_logical_cpus(8)


# ---------------------------------------------------------------- MirroredStrategy vs one device

@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_matches_single_device_training(tmp_path):
    # medops' own input pipeline (seeded shuffle, default augmentation), as training uses it
    common = ["--n", "256", "--batch", "32", "--epochs", "3", "--lr", "0.3", "--seed", "7",
              "--pipeline", "medops", "--dtype", "float64"]
    workers.run_workers(
        {
            "single": (["--strategy", "default", "--out", str(tmp_path / "single"), *common], {}),
            "mirrored": (["--strategy", "mirrored", "--out", str(tmp_path / "mirrored"), *common], {}),
        },
        tmp_path, timeout=300,
    )
    info = workers.assert_matches_single_device(tmp_path / "single", tmp_path / "mirrored")
    assert info["plan"]["strategy"] == "mirrored" and info["replicas_in_sync"] == 2
    assert info["plan"]["devices"] == ["/cpu:0", "/cpu:1"]
