"""A long stage's progress as lines of its output, for the training flow to follow.

A stage that DVC reproduces is a subprocess of a subprocess: the flow sees only its output (which
it reads line by line while ``dvc repro`` runs, medops.ops.dvc.run_dvc). So a stage reports its
progress as a line on stderr, which people read in a terminal as well::

    medops progress: train 3/10 epochs (loss 0.4123, auc 0.8812, val_loss 0.4410, val_auc 0.8705)

``parse_progress`` reads such a line back (the flow turns it into a Prefect progress artifact).
The stage adapters in medops.pipeline pass ``progress_printer`` (ingest's ``progress`` callback) and
``keras_progress`` (a training callback) to the stages: the stages themselves do not import this
module, so a change of wording here reruns nothing under ``dvc repro``.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, Callable

PREFIX = "medops progress:"
_LINE = re.compile(rf"^{re.escape(PREFIX)} (?P<stage>[\w-]+) (?P<done>\d+)/(?P<total>\d+)(?: (?P<unit>\w+))?")


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int
    unit: str = ""

    @property
    def percent(self) -> float:
        """0-100, what a Prefect progress artifact shows."""
        return 100.0 * min(self.done, self.total) / self.total if self.total > 0 else 0.0


def format_progress(progress: Progress, detail: str = "") -> str:
    line = f"{PREFIX} {progress.stage} {progress.done}/{progress.total} {progress.unit}".rstrip()
    return f"{line} ({detail})" if detail else line


def parse_progress(line: str) -> Progress | None:
    """The Progress a ``medops progress:`` line reports, or None for any other line."""
    match = _LINE.match(line.strip())
    if match is None:
        return None
    return Progress(match["stage"], int(match["done"]), int(match["total"]), match["unit"] or "")


def throttled(report: Callable[[int, int], None], min_interval_s: float = 1.0) -> Callable[[int, int], None]:
    """``report(done, total)`` passed on at most once per ``min_interval_s``, and always the last
    call (done == total): what a progress display needs from a callback called per item."""
    last = [float("-inf")]

    def call(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < min_interval_s:
            return
        last[0] = now
        report(done, total)

    return call


def progress_printer(stage: str, unit: str, *, stream: IO[str] | None = None,
                     min_interval_s: float = 1.0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback printing progress lines to ``stream`` (stderr): at most
    one per ``min_interval_s``, and always the last one (done == total)."""
    return throttled(lambda done, total: print(format_progress(Progress(stage, done, total, unit)),
                                               file=stream or sys.stderr, flush=True), min_interval_s)


def keras_progress(stage: str, epochs: int, *, stream: IO[str] | None = None) -> Any:
    """A Keras callback printing one progress line per epoch, with the epoch's metrics: training
    runs with ``verbose=0``, so without it a long run says nothing until it ends."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            print(format_progress(Progress(stage, 0, epochs, "epochs")), file=stream or sys.stderr, flush=True)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            detail = ", ".join(f"{k} {float(v):.4f}" for k, v in (logs or {}).items()
                               if isinstance(v, (int, float)) or hasattr(v, "__float__"))
            print(format_progress(Progress(stage, epoch + 1, epochs, "epochs"), detail),
                  file=stream or sys.stderr, flush=True)

    return EpochProgress()
