"""watch: notice studies landing in the export folder, and say so once per delivery.

A hospital's export arrives as a burst: a PACS push or a copy of a thousand files takes seconds to
minutes, file by file. :class:`ExportWatcher` follows the folder's changes (watchdog: a scan every
second by default, or the kernel's inotify events) and waits until it has been quiet for ``quiet_s`` seconds
before it reports the delivery, so a copy of 1,000 files makes one report, not 1,000. A file that
is still growing keeps the folder "busy" (each write is an event).

``medops watch`` turns each report into the Prefect event ``medops.export.changed`` (payload: how
many file events, over how long; never a path: hospitals name files after patients), which the
ingest-studies deployment's trigger turns into an ingest run (see flows/serve.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

EXPORT_CHANGED = "medops.export.changed"


@dataclass(frozen=True)
class Delivery:
    """One quiet-separated burst of changes below the export folder."""

    events: int          # file created / modified / moved / deleted events in the burst
    first_s: float       # time.monotonic() of its first event
    last_s: float        # and of its last


class _Burst:
    """Events counted as they come; :meth:`settled` hands out a burst once it has been quiet."""

    def __init__(self, quiet_s: float) -> None:
        self.quiet_s = quiet_s
        self.lock = threading.Lock()
        self.count = 0
        self.first = self.last = 0.0

    def add(self, now: float) -> None:
        with self.lock:
            if self.count == 0:
                self.first = now
            self.count += 1
            self.last = now

    def settled(self, now: float) -> Delivery | None:
        with self.lock:
            if self.count == 0 or now - self.last < self.quiet_s:
                return None
            delivery = Delivery(self.count, self.first, self.last)
            self.count = 0
            return delivery


class _NoPaths(logging.Handler):
    """watchdog's records passed on to medops' log with their level only: their text names the
    export's folders and files."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(__name__).log(
            record.levelno, "watchdog reported a problem watching the export folder (%s; details "
            "withheld: they name its files)", record.levelname)


class ExportWatcher:
    """Watch ``folder`` (recursively) and call ``on_delivery`` once per quiet-separated burst.

    ``on_delivery`` runs on the watcher's own thread; an exception in it is logged by the caller's
    callback, not raised here (see :func:`run_watch`). Use as a context manager, or start/stop.
    """

    def __init__(self, folder: Path, on_delivery: Callable[[Delivery], None], *, quiet_s: float = 3.0,
                 poll_s: float = 0.25, inotify: bool = False, scan_s: float = 1.0) -> None:
        self.folder = Path(folder)
        self.inotify = inotify
        self.scan_s = scan_s
        self.on_delivery = on_delivery
        self.poll_s = poll_s
        self._burst = _Burst(quiet_s)
        self._stop = threading.Event()
        self._observer = None
        self._thread: threading.Thread | None = None

    def start(self) -> "ExportWatcher":
        import warnings

        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        # watchdog's own messages name folders and files of the export, which hospitals build from
        # patients' names: only their level reaches the log (and only errors: on an export of
        # thousands of folders an inotify overflow is reported at length, per folder)
        # (every watchdog logger, its top one and those its modules made, with this one handler
        # alone: a logging setup applied since can have made a child propagate again or given it
        # the root's handlers; seen in the test suite)
        names = ["watchdog"] + [n for n in logging.root.manager.loggerDict if n.startswith("watchdog.")]
        for name in names:
            quiet = logging.getLogger(name)
            quiet.setLevel(logging.ERROR)
            top = name == "watchdog"
            quiet.handlers = [_NoPaths()] if top else []
            quiet.propagate = not top  # children up to "watchdog", whose handler withholds the text
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"watchdog\.")

        burst = self._burst

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # noqa: ANN001 - watchdog's event type
                if not event.is_directory and event.event_type in ("created", "modified", "moved",
                                                                   "deleted", "closed"):
                    burst.add(time.monotonic())

        if not self.folder.is_dir():
            from medops.errors import ConfigError

            raise ConfigError(f"the export folder {self.folder} does not exist (ingest.source)")
        # Scanning (every scan_s) by default: recursive inotify on an export of ~6,000 folders was
        # seen to overflow the kernel's queue during a delivery and then to stop reporting at all
        # (the demo's watcher missed its third delivery); inotify stays an option for exports
        # whose tree is too large to scan every second.
        self._observer = Observer() if self.inotify else PollingObserver(timeout=self.scan_s)
        self._observer.schedule(Handler(), str(self.folder), recursive=True)
        self._observer.start()
        self._thread = threading.Thread(target=self._loop, name="medops-watch", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            delivery = self._burst.settled(time.monotonic())
            if delivery is not None:
                self.on_delivery(delivery)

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "ExportWatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def emit_export_changed(delivery: Delivery, export: Path) -> None:
    """The Prefect event for one delivery: counts and timing only, no file name."""
    from prefect.events import emit_event

    emit_event(
        event=EXPORT_CHANGED,
        resource={"prefect.resource.id": "medops.export", "prefect.resource.name": "export folder"},
        payload={"file_events": delivery.events,
                 "burst_seconds": round(delivery.last_s - delivery.first_s, 3)},
    )


def run_watch(export: Path, *, quiet_s: float, log: Callable[[str], None],
              stop: threading.Event | None = None, inotify: bool = False) -> None:
    """``medops watch``: emit ``medops.export.changed`` for each delivery until ``stop`` is set
    (or the process is interrupted)."""
    stop = stop or threading.Event()

    def report(delivery: Delivery) -> None:
        try:
            emit_export_changed(delivery, export)
            log(f"{delivery.events} file event(s) in {delivery.last_s - delivery.first_s:.1f} s: "
                f"emitted {EXPORT_CHANGED}")
        except Exception as exc:  # the Prefect server may be restarting: the next delivery retries
            log(f"could not emit {EXPORT_CHANGED}: {type(exc).__name__}: {exc}")

    with ExportWatcher(export, report, quiet_s=quiet_s, inotify=inotify):
        log(f"watching {export} ({'inotify' if inotify else 'scanned every second'}; a delivery is "
            f"reported after {quiet_s:g} s of quiet)")
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
