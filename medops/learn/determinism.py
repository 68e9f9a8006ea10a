"""determinism: the one place that makes training give the same weights on any machine of a kind.

Why it is needed (measured on a 2-core AVX-512/AMX machine, medops' seeded data pipeline, same
seed, same data): two runs in one process setting are bit-identical, but TensorFlow picks its
float32 kernels by the CPU and the thread count, and training amplifies the rounding differences:

- oneDNN (``TF_ENABLE_ONEDNN_OPTS``, on by default on x86) chooses its convolution/matmul kernels
  by the CPU's instruction set: capping them at AVX2 (``ONEDNN_MAX_CPU_ISA``) moved the test
  probabilities of a small model by 6.8e-4 after 24 steps;
- turning oneDNN off does not remove it: TensorFlow's Eigen contraction then calls oneDNN's sgemm,
  which also picks its blocking by the CPU (9.7e-3 apart, native vs AVX2);
- the number of intra-op threads changes how reductions are split, hence their order.

``DeterminismSettings`` pins all of it: the oneDNN ISA capped at a level every x86-64 machine of
this kind has (AVX2), a fixed intra-op thread count (inter-op threads only run independent ops side
by side, which changes no result, so they are left alone: pinning them to 1 can stall collective
ops under tf.distribute), TensorFlow's op determinism
(``tf.config.experimental.enable_op_determinism``: deterministic kernels and tf.data order, or an
error for an op that has none) and the seeds (``keras.utils.set_random_seed``, done in
``medops.learn.distribute.fit_under_plan``). The environment variables are read by TensorFlow and
oneDNN once, when they first run, so ``apply_determinism`` must run in the training process before
TensorFlow is imported: ``medops stage train`` (a fresh process under ``dvc repro`` and the
Prefect flow) calls it first, through ``medops.stages.train.pin_numerics``. A process where
TensorFlow already runs (a test, a notebook calling ``train.run``) is left as it is, and train.json
says so (``determinism.complete: false``).

Params: ``train.deterministic`` (true: these settings) and ``train.threads`` (the pinned thread
count). The cost in training time is measured in benchmarks/quality/README.md.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import MutableMapping

from pydantic import BaseModel, ConfigDict

# every x86-64 CPU of the machines medops is run on has AVX2 (Haswell, 2013, and later); oneDNN's
# kernels capped there are the same code on an AVX-512/AMX CPU and on an AVX2-only one
PINNED_ISA = "AVX2"


class DeterminismSettings(BaseModel):
    """What a deterministic training process pins (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    threads: int = 2               # intra-op threads (and OMP_NUM_THREADS)
    onednn: bool = True            # TF_ENABLE_ONEDNN_OPTS
    max_cpu_isa: str = PINNED_ISA  # ONEDNN_MAX_CPU_ISA
    op_determinism: bool = True    # tf.config.experimental.enable_op_determinism

    def environment(self) -> dict[str, str]:
        """The environment variables to set before TensorFlow is imported."""
        return {
            "TF_ENABLE_ONEDNN_OPTS": "1" if self.onednn else "0",
            "ONEDNN_MAX_CPU_ISA": self.max_cpu_isa,
            "OMP_NUM_THREADS": str(self.threads),
            "TF_NUM_INTRAOP_THREADS": str(self.threads),
        }


class DeterminismRecord(BaseModel):
    """What ``apply_determinism`` did, for train.json."""

    enabled: bool
    complete: bool                 # every setting took effect (TensorFlow was not yet imported)
    settings: DeterminismSettings | None = None
    notes: list[str] = []


def apply_environment(settings: DeterminismSettings,
                      env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Write ``settings.environment()`` into ``env`` (default os.environ), overriding what was
    there (a user's ONEDNN_MAX_CPU_ISA or OMP_NUM_THREADS included); returns what it replaced."""
    env = os.environ if env is None else env
    replaced = {}
    for key, value in settings.environment().items():
        if env.get(key) not in (None, value):
            replaced[key] = str(env[key])
        env[key] = value
    return replaced


_APPLIED: DeterminismRecord | None = None  # what this process applied (once per process)


def applied() -> DeterminismRecord | None:
    """What ``apply_determinism`` pinned in this process (None: nothing)."""
    return _APPLIED


def apply_determinism(enabled: bool, settings: DeterminismSettings | None = None) -> DeterminismRecord:
    """Pin this process's TensorFlow to ``settings`` (when ``enabled``); call before TensorFlow is
    imported (a second call returns the first call's record).

    When TensorFlow is already running in this process (a test, a notebook) nothing is changed:
    oneDNN and the thread pools read their settings once, and op determinism would reach every later
    user of the process. The record then says ``complete: false`` (and a warning why); train in
    its own process (``medops stage train``, which ``dvc repro`` runs) for a reproducible model.
    """
    global _APPLIED
    if not enabled:
        return DeterminismRecord(enabled=False, complete=True,
                                 notes=["train.deterministic is false: TensorFlow's own defaults"])
    settings = settings or DeterminismSettings()
    if _APPLIED is not None:
        if _APPLIED.settings != settings:
            return DeterminismRecord(enabled=True, complete=False, settings=settings, notes=[
                f"this process was already pinned to {_APPLIED.settings}; not changed"])
        return _APPLIED
    if "tensorflow" in sys.modules:
        note = ("TensorFlow was already running in this process: settings not applied (train in its "
                "own process, e.g. `medops stage train`, for a reproducible model)")
        warnings.warn(note, stacklevel=2)
        return DeterminismRecord(enabled=True, complete=False, settings=settings, notes=[note])
    replaced = apply_environment(settings)
    notes = [f"{k} was {v!r}, set to {settings.environment()[k]!r}" for k, v in sorted(replaced.items())]

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(settings.threads)
    if settings.op_determinism:
        tf.config.experimental.enable_op_determinism()
    _APPLIED = DeterminismRecord(enabled=True, complete=True, settings=settings, notes=notes)
    return _APPLIED
