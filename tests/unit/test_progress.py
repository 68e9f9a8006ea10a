"""medops.ops.progress: the progress lines long stages print and the flow reads back."""

from __future__ import annotations

import io

from medops.ops.progress import Progress, format_progress, parse_progress, progress_printer


def test_a_progress_line_reads_back() -> None:
    line = format_progress(Progress("train", 3, 10, "epochs"), "loss 0.4123, val_auc 0.8705")
    assert line == "medops progress: train 3/10 epochs (loss 0.4123, val_auc 0.8705)"
    assert parse_progress(line) == Progress("train", 3, 10, "epochs")
    assert parse_progress(line).percent == 30.0
    assert parse_progress("medops progress: ingest 64/0") == Progress("ingest", 64, 0)
    assert Progress("ingest", 64, 0).percent == 0.0
    assert parse_progress("Running stage 'train':") is None
    assert parse_progress("Epoch 3/10") is None


def test_the_printer_is_throttled_but_always_prints_the_end() -> None:
    out = io.StringIO()
    report = progress_printer("ingest", "files", stream=out, min_interval_s=3600)
    for done in (64, 128, 192):
        report(done, 200)
    report(200, 200)
    assert out.getvalue().splitlines() == ["medops progress: ingest 64/200 files",
                                           "medops progress: ingest 200/200 files"]


def test_the_keras_callback_prints_one_line_per_epoch() -> None:
    from medops.ops.progress import keras_progress

    out = io.StringIO()
    callback = keras_progress("train", 2, stream=out)
    callback.on_train_begin()
    callback.on_epoch_end(0, {"loss": 0.5, "val_auc": 0.75})
    lines = out.getvalue().splitlines()
    assert lines == ["medops progress: train 0/2 epochs",
                     "medops progress: train 1/2 epochs (loss 0.5000, val_auc 0.7500)"]
