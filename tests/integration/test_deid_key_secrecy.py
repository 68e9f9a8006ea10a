"""The de-identification key never leaves its secret: not in the process list, not in logs,
artifacts, parameters or events of the Prefect API, not in any file ingest, DVC or Prefect write.

A copy of the project with a small synthetic export; a distinctive key. The ingest-studies flow
runs against a real Prefect server (decoding in a process pool), then `medops ingest --cluster
local` (a Dask LocalCluster) with the key in $MEDOPS_DEID_KEY, then `medops ingest` with the key
in the project's key file instead. Meanwhile a sampler reads /proc/*/cmdline of every process
many times a second. Afterwards every file of the project (DVC cache and remote, data/, reports/,
models/, .medops/ with Prefect's database and the logs; only the key file itself excepted) and the
Prefect API are searched for the key, as text, hex and base64.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from _project import clone_project

pytestmark = [pytest.mark.prefect, pytest.mark.dvc, pytest.mark.slow]

KEY = b"DEIDKEY-canary-5f3b9e1c7a2d48b0-zebra"          # by environment
FILE_KEY = b"FILEKEY-canary-91c4e7b2d0a6f358-okapi\x00\xff"  # by key file (binary is fine)


def _forms(key: bytes) -> list[bytes]:
    """How a leaked key could look on disk or on the wire."""
    return [key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key).rstrip(b"=")]


class CmdlineSampler(threading.Thread):
    """Reads every process's command line until stopped; remembers any that held a key."""

    def __init__(self, keys: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.keys, self.leaks, self.seen = keys, [], set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                self.seen.add(cmd.replace(b"\0", b" ").strip())
                if any(form in cmd for key in self.keys for form in _forms(key)):
                    self.leaks.append((pid, cmd))
            time.sleep(0.02)


def _files_holding(root: Path, keys: list[bytes], skip: set[Path]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path not in skip:
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {form[:12]!r}..." for key in keys for form in _forms(key)
                      if form in data]
    return found


def _run(argv: list[str], root: Path, env: dict[str, str], log: Path) -> None:
    with log.open("ab") as out:
        done = subprocess.run(argv, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode == 0, log.read_text(errors="replace")[-3000:]


def _prefect_records(api: str, run_id: str) -> list[str]:
    """Everything the Prefect API holds about the run: the run (parameters), its logs, artifacts
    and the events of the last hour, as JSON text."""
    out = [httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).text]
    offset = 0
    while True:
        page = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}},
                                                       "limit": 200, "offset": offset}, timeout=10)
        out.append(page.text)
        if len(page.json()) < 200:
            break
        offset += 200
    out.append(httpx.post(f"{api}/artifacts/filter", json={}, timeout=10).text)
    out.append(httpx.post(f"{api}/variables/filter", json={}, timeout=10).text)
    events = httpx.post(f"{api}/events/filter", json={"limit": 50}, timeout=10)
    assert events.status_code == 200, events.text
    out.append(events.text)
    return out


def test_the_deid_key_is_in_no_process_list_log_artifact_parameter_or_file(tmp_path: Path, free_port) -> None:
    from medops.config import load_params
    from medops.ops.demo import _service_env, ensure_export
    from medops.ops.prefect_server import start_prefect, stop_prefect
    from medops.paths import ProjectPaths

    root = clone_project(tmp_path / "project", {
        "synth": {"max_images_per_split": 40},
        "ingest": {"incremental": False, "workers": 2},  # every run decodes every file again
        "prefect": {"port": free_port(), "train_on_new_data": False},
    })
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    assert ensure_export(paths, params)
    env = {**_service_env(paths, params), "MEDOPS_DEID_KEY": KEY.decode()}
    log = tmp_path / "run.log"
    sampler = CmdlineSampler([KEY, FILE_KEY])
    sampler.start()
    try:
        start_prefect(params.prefect, state_dir=paths.state)
        _run([sys.executable, "-m", "flows.run", "ingest-studies", "--project", str(root)], root, env, log)
        _run([sys.executable, "-m", "medops", "--project", str(root), "ingest", "--cluster", "local"],
             root, env, log)
        # the same with the key in the project's key file
        key_file = paths.state / "secrets" / "deid.key"
        key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_file.write_bytes(FILE_KEY)
        key_file.chmod(0o600)
        no_env = {k: v for k, v in env.items() if k != "MEDOPS_DEID_KEY"}
        _run([sys.executable, "-m", "medops", "--project", str(root), "ingest"], root, no_env, log)

        api = params.prefect.api_url
        [run] = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        assert run["state_type"] == "COMPLETED"
        time.sleep(3)  # let the server's event persister and log writer flush
        records = "\n".join(_prefect_records(api, run["id"])).encode()
        assert b"ingest-studies" in records and b"project_root" in records  # the search reaches the data
        assert not [form for key in (KEY, FILE_KEY) for form in _forms(key) if form in records]
    finally:
        stop_prefect(paths.state)
        sampler.stop.set()
        sampler.join(10)

    assert sampler.leaks == []
    # the sampler did see the work: the flow, both ingests and their decoding processes
    seen = b"\n".join(sampler.seen)
    assert b"flows.run ingest-studies" in seen and b"medops --project" in seen
    assert b"dask" in seen.lower() or b"spawn_main" in seen  # the LocalCluster's worker processes

    assert (root / "data" / "ingested.dvc").is_file() and any((root / "dvc-remote").rglob("*"))
    assert (paths.state / "prefect" / "prefect.db").is_file()
    # every file: the project (DVC cache and remote, outputs, .medops/ with Prefect's database and
    # the servers' logs) and what the commands printed (run.log)
    assert _files_holding(tmp_path, [KEY, FILE_KEY], skip={key_file}) == []
