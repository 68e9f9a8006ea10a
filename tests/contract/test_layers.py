"""The package's layers, as the tree shows them: a module imports only modules of its own layer or
below (lazy imports inside functions count; ``if TYPE_CHECKING:`` imports do not), and no
import circle exists at all. A new module must be placed in LAYERS, or this test fails."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# Bottom to top. A prefix names a package (every module below it) or one module.
LAYERS: list[tuple[str, ...]] = [
    ("medops.__init__", "medops.errors", "medops.hashing", "medops.procs",  # no medops imports
     "medops.atomic"),
    ("medops.models", "medops.paths"),             # model architectures: keras only
    ("medops.config",),                            # params.yaml, typed (checks model names)
    # formats, numbers, DICOM, offline Data Docs (HTML)
    ("medops.data", "medops.metrics", "medops.results", "medops.dicom", "medops.datadocs",
     "medops.drift"),
    ("medops.learn",),                             # input pipeline, distribution, inference
    ("medops.serving.contract", "medops.serving.repository", "medops.serving.backends",
     "medops.serving.audit"),
    ("medops.stages",),                            # one package or module per stage
    ("medops.serving.server", "medops.serving.client", "medops.serving.deploy"),
    ("medops.ops", "medops.pipeline"),             # DVC, Prefect server, the demo; the registry
    ("medops.cli", "medops.__main__"),
    ("flows",),                                    # Prefect flows: wiring on top of everything
]

# Packages whose __init__ holds only a docstring: they sit at the bottom (importing a child imports
# them first), while their children have layers of their own.
DOCSTRING_PACKAGES = {"medops.serving", "medops.stages", "medops.learn", "medops.ops"}

REPO = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def layer_of(module: str) -> int:
    if module == "medops":  # the package's __init__ (only __version__)
        module = "medops.__init__"
    if module in DOCSTRING_PACKAGES:
        return 0
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return rank


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The medops/flows modules that ``path`` imports at run time (lazily or not)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found - {module_name(path)}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = [p for top in ("medops", "flows") for p in (REPO / top).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)
    for package in DOCSTRING_PACKAGES:
        assert not graph[package], f"{package}/__init__.py imports {graph[package]}"


def find_climbs(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                  for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    # a package's __init__ is imported on the way to its children: a child importing its own
    # parent package is not a circle, so those edges are left out
    def edges(m: str) -> list[str]:
        return sorted(d for d in graph.get(m, ()) if not m.startswith(d + "."))

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in edges(m):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def find_stage_imports(graph: dict[str, set[str]]) -> list[str]:
    """Stages are entry points, not libraries: only the wiring (the registry, the CLI, the flows)
    imports a stage, and a stage imports no other stage (a shared helper goes below them)."""
    def stage(m: str) -> str | None:
        parts = m.split(".")
        return ".".join(parts[:3]) if parts[:2] == ["medops", "stages"] and len(parts) > 2 else None

    wiring = ("medops.pipeline", "medops.cli", "flows")
    return sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                  if stage(d) and stage(d) != stage(m)
                  and not any(m == w or m.startswith(w + ".") for w in wiring))


def test_only_the_wiring_imports_a_stage(graph):
    found = find_stage_imports(graph)
    assert not found, "stage modules used as libraries:\n" + "\n".join(found)


def test_no_module_imports_one_above_its_layer(graph):
    climbs = find_climbs(graph)
    assert not climbs, "imports that climb back up:\n" + "\n".join(climbs)


def test_no_import_circle(graph):
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_checks_can_fail():
    # the shape medops had: config -> models -> serving.contract -> config, and deploy -> gate
    old = {
        "medops.config": {"medops.models"},
        "medops.models": {"medops.serving.contract"},
        "medops.serving.contract": {"medops.config"},
        "medops.serving.deploy": {"medops.stages.gate"},
        "medops.stages.gate": set(),
    }
    assert find_circle(old) == ["medops.config", "medops.models", "medops.serving.contract",
                                "medops.config"]
    assert find_climbs(old) == ["medops.models (layer 1) imports medops.serving.contract (layer 5)"]
    assert find_stage_imports({**old, "medops.stages.train": {"medops.stages.evaluate"},
                               "medops.pipeline": {"medops.stages.train"}}) == [
        "medops.serving.deploy imports medops.stages.gate",
        "medops.stages.train imports medops.stages.evaluate",
    ]
    assert find_circle({"medops.dicom.io": {"medops.dicom"}, "medops.dicom": set()}) is None
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("somewhere.else")
