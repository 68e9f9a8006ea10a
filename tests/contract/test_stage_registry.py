"""The stage registry, dvc.yaml and the CLI name the same stages, params and code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from medops.cli import build_parser
from medops.config import Params
from medops.pipeline import STAGES


@pytest.fixture(scope="module")
def dvc_stages(repo_root):
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


def test_every_registered_stage_is_a_dvc_stage_and_back(dvc_stages):
    assert set(dvc_stages) == set(STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_stage_runs_the_registered_stage(name, dvc_stages, repo_root):
    stage = dvc_stages[name]
    assert stage["cmd"] == f"medops stage {name}"
    # only the sections the stage reads, so an unrelated change does not rerun it
    assert sorted(stage["params"]) == sorted(STAGES[name].sections)
    module_file = _module_file(STAGES[name].module, repo_root)
    deps = [d.rstrip("/") for d in stage["deps"]]
    assert any(module_file == d or module_file.startswith(d + "/") for d in deps), (
        f"{name}: dvc.yaml deps lack {module_file}")


# Definitions every stage imports; their behaviour reaches a stage through params.yaml (tracked
# per section) or the stage's own code, so they are not listed as code deps.
_SHARED = {"medops/__init__.py", "medops/errors.py", "medops/config.py", "medops/paths.py"}


def _module_file(module: str, repo_root) -> str:
    """The file a module's import runs: ``a/b.py``, or ``a/b/__init__.py`` for a package."""
    base = module.replace(".", "/")
    return base + ".py" if (repo_root / (base + ".py")).is_file() else base + "/__init__.py"


def _medops_imports(path, repo_root) -> set[str]:
    """The medops source files ``path`` imports (any import statement, lazy ones included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("medops"):
                continue
            base = repo_root / name.replace(".", "/")
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    found.add(candidate.relative_to(repo_root).as_posix())
    return found


def code_closure(module: str, repo_root) -> set[str]:
    """Every medops file the stage module runs, following imports transitively."""
    todo = [_module_file(module, repo_root)]
    seen: set[str] = set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        if rel not in _SHARED:  # config.py validates model names against medops.models: not a dep
            todo.extend(_medops_imports(repo_root / rel, repo_root) - seen)
    return seen - _SHARED


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_deps_cover_all_the_code_a_stage_runs(name, dvc_stages, repo_root):
    # a change to any medops file a stage imports must rerun that stage under `dvc repro`
    deps = [d.rstrip("/") for d in dvc_stages[name]["deps"] if d.startswith("medops")]
    covered = lambda rel: any(rel == d or rel.startswith(d + "/") for d in deps)  # noqa: E731
    missing = sorted(rel for rel in code_closure(STAGES[name].module, repo_root) if not covered(rel))
    assert not missing, f"dvc.yaml stage {name!r} lacks code deps: {missing}"


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_deps_list_no_code_the_stage_does_not_run(name, dvc_stages, repo_root):
    # the other direction: a code dep the stage never imports reruns it for nothing (editing a plot
    # in evaluate used to retrain the model, because train listed medops/stages/evaluate.py)
    closure = code_closure(STAGES[name].module, repo_root)
    deps = [d.rstrip("/") for d in dvc_stages[name]["deps"] if d.startswith("medops")]
    unused = [d for d in deps if not any(rel == d or rel.startswith(d + "/") for rel in closure)]
    assert not unused, f"dvc.yaml stage {name!r} lists code it does not run: {unused}"


def test_a_plot_in_evaluate_does_not_retrain(repo_root):
    assert "medops/stages/evaluate.py" not in code_closure("medops.stages.train", repo_root)
    assert "medops/metrics.py" in code_closure("medops.stages.train", repo_root)


def test_code_closure_follows_lazy_and_transitive_imports(repo_root):
    closure = code_closure("medops.stages.train", repo_root)
    assert "medops/learn/input_pipeline.py" in closure          # module-level import
    assert "medops/learn/distribute.py" in closure       # imported inside a function
    assert "medops/models/__init__.py" in closure  # a package
    assert "medops/config.py" not in closure       # shared definitions are left out


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_sections_exist_in_params(name):
    for section in STAGES[name].sections:
        assert section in Params.model_fields


def test_deploy_is_not_a_dvc_stage(dvc_stages):
    # deploy changes a running server: it belongs to the CLI and the flow, not `dvc repro`
    assert "deploy" not in dvc_stages


def test_cli_stage_rejects_unknown_stage(capsys):
    # a typed error the CLI reports in one line (bad input, exit 3), not a traceback
    from medops.cli import main
    from medops.errors import ConfigError, ExitCode
    from medops.pipeline import run_stage

    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        run_stage("nope", None, None)
    assert main(["stage", "nope"]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "medops stage: error: unknown stage 'nope'; stages: quality, split" in err
    assert "Traceback" not in err


def test_cli_has_the_documented_commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("synth", "ingest", "stage", "serve", "deploy", "predict", "up", "down", "demo"):
        assert name in sub.choices


def test_light_imports_do_not_pull_tensorflow(repo_root):
    # Triton's Python-backend stub and `medops predict` import these; TensorFlow must stay out
    code = (
        "import sys; import medops.config, medops.dicom.pixels, medops.serving.client, "
        "medops.serving.contract, medops.cli, medops.pipeline; "
        "bad = [m for m in ('tensorflow', 'keras', 'prefect') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", list(STAGES))
def test_each_adapter_runs_the_module_the_registry_names(name):
    # the registry is a table a reader (and this test) can follow: the adapter named NAME imports
    # run() from the module the table lists, so `module` (which dvc.yaml deps follow) cannot drift
    import inspect

    stage = STAGES[name]
    assert stage.call.__name__ == name
    assert f"from {stage.module} import run\n" in inspect.getsource(stage.call)
