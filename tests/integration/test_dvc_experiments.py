"""DVC's own ways of running and comparing experiments work on the project, with the real dvc.

A copy of what a clone holds (dvc.yaml, params.yaml, gx/, medops) in a temporary git + DVC
repository, with a tiny de-identified dataset versioned by ``dvc add``:

- ``dvc exp run -S train.epochs=2 train`` reproduces quality, split and train with the value set,
  and DVCLive's per-epoch curves reach ``dvc exp show`` and ``dvc plots show``;
- ``dvc exp run --queue`` twice, then ``dvc queue start``: both run, in DVC's temporary copies of
  the project (not in the workspace, whatever MEDOPS_ROOT says), and ``dvc exp show`` compares them;
- the model registry: after ``gto register``, ``dvc artifacts get`` fetches that version by name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _ingested import build_ingested  # noqa: E402

from medops.ops import dvc  # noqa: E402

pytestmark = [pytest.mark.dvc, pytest.mark.slow, pytest.mark.long]

GIT = ["git", "-c", "user.name=medops-test", "-c", "user.email=test@medops.invalid"]
GENERATED = ("tests/", "benchmarks/", "data/", "models/", "reports/", ".medops/", "dvc-remote/", "dvclive/")


def _copy_clone(repo_root: Path, dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo_root,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in listed:
        src = repo_root / rel
        if src.is_file() and not rel.startswith(GENERATED) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _commit(root: Path, message: str) -> None:
    subprocess.run(GIT + ["add", "-A"], cwd=root, check=True)
    subprocess.run(GIT + ["commit", "-qm", message], cwd=root, check=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root):
    from medops.config import update_params_file

    root = tmp_path_factory.mktemp("dvc-exp")
    _copy_clone(repo_root, root)
    update_params_file(root / "params.yaml", {"train": {
        "epochs": 1, "batch_size": 32, "filters": [8, 16], "dense_units": 16}})
    build_ingested(root / "data" / "ingested", n_per_split={"train": 240, "val": 60, "test": 60})
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc.add(root, "data/ingested")
    _commit(root, "a tiny project")
    return root


def _exp_show(root: Path) -> dict[str, dict]:
    """``dvc exp show --json``: each experiment's name -> its params and metrics."""
    rows = json.loads(dvc.run_dvc(root, "exp", "show", "--json").stdout)
    found = {}
    for baseline in rows:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                found[rev.get("name") or exp.get("name")] = data
    return found


def _value(data: dict, kind: str, path: str) -> dict:
    return data[kind][path]["data"]


def test_exp_run_set_param_trains_with_it_and_dvclive_curves_reach_exp_show_and_plots(project):
    dvc.run_dvc(project, "exp", "run", "-S", "train.epochs=2", "-n", "two-epochs", "train")
    data = _exp_show(project)["two-epochs"]
    assert _value(data, "params", "params.yaml")["train"]["epochs"] == 2
    live = _value(data, "metrics", "dvclive/metrics.json")
    assert live["step"] == 1 and 0.0 <= live["eval"]["auc"] <= 1.0 and live["train"]["loss"] > 0
    # the workspace holds the experiment's outputs: one curve row per epoch
    rows = (project / "dvclive" / "plots" / "metrics" / "eval" / "auc.tsv").read_text().splitlines()
    assert len(rows) == 1 + 2
    record = json.loads((project / "models" / "train.json").read_text())
    assert record["epochs_run"] == 2 and record["tensorboard_dir"].endswith("-two-epochs")
    plots = json.loads(dvc.run_dvc(project, "plots", "show", "--json").stdout)["data"]
    assert plots["Training curves (AUC, per epoch)"] and plots["Training curves (loss, per epoch)"]
    [curve] = plots["dvclive/plots/metrics/eval/auc.tsv"]  # the stage's own plot, one per metric
    assert [row["step"] for row in curve["content"]["data"]["values"]] == ["0", "1"]


def test_queued_experiments_run_in_dvc_temporary_copies_and_are_compared(project, monkeypatch):
    # a MEDOPS_ROOT naming the workspace must not send a queued run's stages there
    monkeypatch.setenv("MEDOPS_ROOT", str(project))
    before = (project / "models" / "model.keras").read_bytes() if (project / "models" / "model.keras").exists() else None
    dvc.run_dvc(project, "exp", "run", "--queue", "-S", "train.epochs=1", "-n", "queued-lr-1e-3", "train")
    dvc.run_dvc(project, "exp", "run", "--queue", "-S", "train.epochs=1", "-S", "train.learning_rate=0.003",
                "-n", "queued-lr-3e-3", "train")
    dvc.run_dvc(project, "queue", "start", "-j", "1")
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = dvc.run_dvc(project, "queue", "status").stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(3)
        else:
            pytest.fail(f"the queue did not finish in time:\n{status}")
    finally:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "stop"], cwd=project, env=dvc.dvc_env(project),
                       capture_output=True, timeout=120)
    assert status.count("Success") >= 2, status + dvc.run_dvc(project, "queue", "logs", "queued-lr-3e-3").stdout
    shown = _exp_show(project)
    for name, lr in (("queued-lr-1e-3", 0.001), ("queued-lr-3e-3", 0.003)):
        assert _value(shown[name], "params", "params.yaml")["train"]["learning_rate"] == lr
        assert _value(shown[name], "metrics", "dvclive/metrics.json")["step"] == 0
    losses = {n: _value(shown[n], "metrics", "dvclive/metrics.json")["train"]["loss"] for n in
              ("queued-lr-1e-3", "queued-lr-3e-3")}
    assert losses["queued-lr-1e-3"] != losses["queued-lr-3e-3"]
    # they ran in DVC's temporary copies: the workspace's model is the one it had
    after = (project / "models" / "model.keras").read_bytes() if (project / "models" / "model.keras").exists() else None
    assert after == before


def test_the_model_registry_fetches_a_registered_version_by_name(project, tmp_path):
    dvc.run_dvc(project, "exp", "run", "-S", "train.epochs=1", "train")
    _commit(project, "train a model")
    dvc.push(project)
    subprocess.run([str(Path(sys.executable).parent / "gto"), "register", "pneumonia-classifier-keras",
                    "--version", "v0.1.0"], cwd=project, check=True, capture_output=True)
    tags = subprocess.run(["git", "tag"], cwd=project, capture_output=True, text=True).stdout.split()
    assert "pneumonia-classifier-keras@v0.1.0" in tags
    registered = (project / "models" / "model.keras").read_bytes()

    # a later model in the workspace does not change what the registered version fetches
    dvc.run_dvc(project, "exp", "run", "-S", "train.epochs=2", "train")
    assert (project / "models" / "model.keras").read_bytes() != registered
    out = tmp_path / "fetched.keras"
    dvc.run_dvc(project, "artifacts", "get", str(project), "pneumonia-classifier-keras", "--rev", "v0.1.0",
                "-o", str(out))
    assert out.read_bytes() == registered
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["artifacts"]
    assert declared["pneumonia-classifier"] == {**declared["pneumonia-classifier"], "path": "models/model.onnx",
                                                "type": "model"}
