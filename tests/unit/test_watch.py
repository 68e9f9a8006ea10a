"""medops watch: a burst of files landing in the export folder is one delivery (real inotify)."""

from __future__ import annotations

import shutil
import threading
import time

from medops.ops.watch import ExportWatcher


def _wait_for(deliveries, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(deliveries) < n and time.monotonic() < deadline:
        time.sleep(0.05)


import pytest


@pytest.mark.parametrize("inotify", [False, True], ids=["scan", "inotify"])
def test_a_copy_of_many_files_is_one_delivery_and_a_later_one_another(tmp_path, pydicom_ct_bytes, inotify):
    export = tmp_path / "export"
    export.mkdir()
    deliveries = []
    lock = threading.Lock()

    def record(d):
        with lock:
            deliveries.append(d)

    with ExportWatcher(export, record, quiet_s=1.5, poll_s=0.05, inotify=inotify, scan_s=0.5):
        time.sleep(0.6)  # the observer is listening (a first scan is taken)
        # a PACS push: 300 files in nested study folders, written over about a second
        for i in range(300):
            folder = export / f"PAT{i // 50:03d}" / "ST001"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"IM{i:05d}.dcm").write_bytes(pydicom_ct_bytes)
            if i % 50 == 0:
                time.sleep(0.1)  # a gap shorter than quiet_s does not split the delivery
        _wait_for(deliveries, 1, timeout=10)
        time.sleep(2.0)  # nothing more comes for this burst
        assert len(deliveries) == 1
        assert deliveries[0].events >= 300  # at least one event per file
        landed = time.monotonic()
        shutil.copy(next(export.rglob("*.dcm")), export / "late.dcm")
        _wait_for(deliveries, 2, timeout=10)
        assert len(deliveries) == 2
        # reported once the folder was quiet for quiet_s, not long after
        assert 1.5 <= time.monotonic() - landed < 6.0


def test_a_missing_export_folder_is_a_config_error(tmp_path):
    import pytest

    from medops.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        ExportWatcher(tmp_path / "nowhere", lambda d: None).start()


def test_watchdog_messages_never_reach_the_log_with_the_exports_paths(tmp_path, caplog):
    import logging

    export = tmp_path / "Doe_John_MRN123"
    export.mkdir()
    with ExportWatcher(export, lambda d: None, quiet_s=1.0):
        logging.getLogger("watchdog.observers").error("cannot watch %s", export / "Doe_John.dcm",
                                                       exc_info=OSError(f"{export}: gone"))
    assert "watchdog reported a problem" in caplog.text
    assert "Doe_John" not in caplog.text
