"""Mutation testing of one medops module against its fast tests: how many deliberate small bugs
(mutants) do the tests catch?

Each mutant is one small change of the module's syntax tree (an operator swapped, a constant
changed, a statement dropped; see MUTATORS). For each, a child process is forked from this one,
which has already imported pytest and the module's heavy dependencies; the child compiles the
mutated tree in place of the module (same file name and line numbers), runs the named tests
with ``pytest -x`` and exits with pytest's code. Failing tests, an error when the module loads
(deid checks its table at import) or running past the timeout kill the mutant; passing tests
let it survive. The working tree is never written.

Survivors are explained in ``notes.toml`` (next to this file): ``equivalent`` (no input can
tell the mutant from the original) or ``accepted`` (a difference no test should pin, with the
reason). The score is killed / (total - equivalent). Results go to a Markdown file.

Usage (from the repository root, with the project virtualenv)::

    python benchmarks/mutation/run.py medops/dicom/deid.py \\
        --tests tests/unit/test_deid_details.py tests/unit/test_deid_profile.py \\
                tests/unit/test_deid_standard.py tests/unit/test_deid.py \\
        --preload numpy,pydicom,pydantic,medops.config,medops.dicom.io,medops.dicom.table_e1_1 \\
        --out benchmarks/mutation/results-deid.md

(benchmarks/mutation/README.md has both commands, gate's too.)

``--list`` prints the mutants without running them; ``--only ID ...`` runs some; ``--resume
results.json`` reruns only the survivors of an earlier run (after tests were added; a full run
from scratch is the same command without it). Each run writes ``--out`` and a ``.json`` beside it.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import importlib.util
import json
import os
import signal
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot,
            ast.IsNot: ast.Is}
BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
            ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv, ast.BitOr: ast.BitAnd,
            ast.BitAnd: ast.BitOr, ast.RShift: ast.LShift, ast.LShift: ast.RShift,
            ast.Pow: ast.Mult}
ACTION_CODES = ("X", "Z", "K", "U", "D")  # deid's action codes: each mutated into the next one
MESSAGE_CALLS = {"debug", "info", "warning", "error", "exception", "critical"}


@dataclass
class Mutant:
    id: str           # "line:col:what", stable while the line does not move
    line: int
    what: str
    source_line: str


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                ids.add(id(body[0].value))
    return ids


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """Nodes not mutated: docstrings, annotations and ``Literal[...]`` type aliases, messages (raised exceptions' and log calls'
    arguments, f-strings), ``if __name__ == "__main__"`` blocks and ``pragma: no cover`` functions
    (maintenance tools)."""
    skip: set[int] = _docstring_nodes(tree)

    def all_of(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            all_of(node.returns)
            for a in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs,
                      node.args.vararg, node.args.kwarg]:
                if a is not None:
                    all_of(a.annotation)
        elif isinstance(node, ast.AnnAssign):
            all_of(node.annotation)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                and node.value.id == "Literal":  # a type alias: no value at run time
            all_of(node)
        elif isinstance(node, ast.Raise):
            all_of(node.exc)
        elif isinstance(node, ast.JoinedStr):
            all_of(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in MESSAGE_CALLS:
            all_of(node)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
            all_of(node)
    return skip


def _no_cover_functions(tree: ast.AST, lines: list[str]) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                and "pragma: no cover" in lines[node.lineno - 1]:
            skip.update(id(n) for n in ast.walk(node))
    return skip


def mutations(node: ast.AST) -> list[tuple[str, callable]]:
    """(description, apply) pairs for one node; apply mutates the node in place."""
    out: list[tuple[str, callable]] = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            new = CMP_SWAP.get(type(op))
            if new is not None:
                def apply(n, i=i, new=new):
                    n.ops[i] = new()
                nth = f"#{i + 1}" if len(node.ops) > 1 else ""  # a chain: a < b <= c
                out.append((f"{type(op).__name__}->{new.__name__}{nth}", apply))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{type(node.op).__name__}->{new.__name__}", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, ast.BinOp) and type(node.op) in BIN_SWAP:
        new = BIN_SWAP[type(node.op)]
        out.append((f"{type(node.op).__name__}->{new.__name__}", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            out.append((f"{v}->{not v}", lambda n: setattr(n, "value", not n.value)))
        elif isinstance(v, int):
            out.append((f"{v}->{v + 1}", lambda n: setattr(n, "value", n.value + 1)))
        elif isinstance(v, float):
            out.append((f"{v}->{v + 1}", lambda n: setattr(n, "value", n.value + 1)))
        elif isinstance(v, str) and v in ACTION_CODES:
            new = ACTION_CODES[(ACTION_CODES.index(v) + 1) % len(ACTION_CODES)]
            out.append((f"'{v}'->'{new}'", lambda n, new=new: setattr(n, "value", new)))
        elif isinstance(v, str):
            out.append((f"{v[:20]!r}->'XX..XX'", lambda n: setattr(n, "value", f"XX{n.value}XX")))
    return out


STATEMENTS = (ast.Delete, ast.Expr, ast.Continue, ast.Break, ast.AugAssign)


def enumerate_mutants(source: str) -> list[tuple[Mutant, int, int]]:
    """Every mutant: (Mutant, node index in ast.walk order, mutation index)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    skip = _skipped_nodes(tree) | _no_cover_functions(tree, lines)
    found = []
    seen: dict[str, int] = {}
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        options = mutations(node)
        if isinstance(node, STATEMENTS) and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            options.append(("statement->pass", None))
        if isinstance(node, ast.Return) and node.value is not None \
                and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            options.append(("return->None", None))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            options.append((f"drop {type(node.op).__name__}", None))
        for k, (what, _) in enumerate(options):
            mid = f"{node.lineno}:{node.col_offset}:{what}"
            seen[mid] = seen.get(mid, 0) + 1
            if seen[mid] > 1:  # nested nodes that start at one place: a / b / c
                mid += f"~{seen[mid]}"
            found.append((Mutant(mid, node.lineno, what, lines[node.lineno - 1].strip()), index, k))
    return found


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, replacement: ast.AST) -> None:
        self.target, self.replacement = target, replacement

    def visit(self, node):  # type: ignore[override]
        if node is self.target:
            return self.replacement
        return super().visit(node)


def mutated_tree(source: str, node_index: int, k: int) -> ast.Module:
    tree = ast.parse(source)
    node = list(ast.walk(tree))[node_index]
    options = mutations(node)
    if k < len(options):
        options[k][1](node)
        return tree
    what = enumerate_mutants(source)  # the statement / return / unary kinds, by description
    desc = next(m.what for m, i, j in what if i == node_index and j == k)
    if desc == "statement->pass":
        replacement = ast.copy_location(ast.Pass(), node)
    elif desc == "return->None":
        replacement = ast.copy_location(ast.Return(value=None), node)
    else:  # drop a unary operator
        replacement = copy.deepcopy(node.operand)
    tree = _Replace(node, replacement).visit(tree)
    return ast.fix_missing_locations(tree)


def run_one(module: str, path: Path, tree: ast.Module, tests: list[str], timeout: float) -> str:
    """'killed', 'survived' or 'timeout', from a forked child running the tests."""
    code = compile(tree, str(path), "exec")
    pid = os.fork()
    if pid == 0:  # the child: the mutated module in place of the real one, then the tests
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            spec = importlib.util.find_spec(module)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module] = mod
            parent, _, leaf = module.rpartition(".")
            if parent:
                setattr(importlib.import_module(parent), leaf, mod)
            try:
                exec(code, mod.__dict__)
            except BaseException:
                os._exit(3)  # the module does not load: every test would fail
            import pytest

            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W",
                              "ignore::UserWarning", *tests])
            os._exit(int(rc))
        except BaseException:
            os._exit(4)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.02)


def load_notes(path: Path, module_path: str) -> dict[str, dict]:
    if not path.is_file():
        return {}
    notes = tomllib.loads(path.read_text()).get(module_path, {})
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the module's file, e.g. medops/dicom/deid.py")
    parser.add_argument("--tests", nargs="+", required=True)
    parser.add_argument("--preload", default="", help="modules to import once, comma-separated")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per mutant")
    parser.add_argument("--notes", default=str(HERE / "notes.toml"))
    parser.add_argument("--out", help="Markdown results file")
    parser.add_argument("--resume", help="a results .json of an earlier run: rerun only its survivors "
                        "(and mutants it does not have); valid while the tests only grew")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args(argv)

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    path = Path(args.path)
    module = ".".join(path.with_suffix("").parts)
    source = path.read_text()
    mutants = enumerate_mutants(source)
    if args.list:
        for m, _, _ in mutants:
            print(f"{m.id:40s} {m.source_line}")
        print(f"{len(mutants)} mutants")
        return 0
    if args.only:
        mutants = [x for x in mutants if x[0].id in set(args.only)]

    import pytest  # noqa: F401 -- loaded once, shared by every child
    for name in filter(None, args.preload.split(",")):
        importlib.import_module(name)
    assert module not in sys.modules, f"--preload imported {module}: its mutants would not be used"

    # the original must pass, or every mutant looks killed
    base = run_one(module, path, ast.parse(source), args.tests, args.timeout * 3)
    if base != "survived":
        print(f"the tests do not pass on the unmutated {path} ({base})", file=sys.stderr)
        return 2

    notes = load_notes(Path(args.notes), args.path)
    earlier = {}
    if args.resume:
        recorded = json.loads(Path(args.resume).read_text())["mutants"]
        ids = Counter(r["id"] for r in recorded)  # an id twice (older runs) is ambiguous: rerun
        earlier = {r["id"]: r["outcome"] for r in recorded
                   if r["outcome"] != "survived" and ids[r["id"]] == 1}
    results: list[tuple[Mutant, str]] = []
    start = time.monotonic()
    for n, (mutant, index, k) in enumerate(mutants, 1):
        if mutant.id in earlier:
            results.append((mutant, earlier[mutant.id]))
            continue
        outcome = run_one(module, path, mutated_tree(source, index, k), args.tests, args.timeout)
        results.append((mutant, outcome))
        print(f"[{n}/{len(mutants)}] {outcome:8s} {mutant.id}  {mutant.source_line[:70]}", flush=True)
    elapsed = time.monotonic() - start
    report = render(args, path, results, notes, elapsed)
    if args.out:
        Path(args.out).write_text(report)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"module": args.path, "tests": args.tests, "mutants": [
                {"id": m.id, "line": m.source_line, "outcome": o} for m, o in results]}, indent=1) + "\n")
    print(report.split("\n## Survivors")[0])
    return 0


def render(args, path: Path, results, notes: dict[str, dict], elapsed: float) -> str:
    killed = sum(1 for _, o in results if o in ("killed", "timeout"))
    survivors = [m for m, o in results if o == "survived"]
    equivalent = [m for m in survivors if notes.get(m.id, {}).get("kind") == "equivalent"
                  and notes[m.id].get("line") == m.source_line]
    accepted = [m for m in survivors if notes.get(m.id, {}).get("kind") == "accepted"
                and notes[m.id].get("line") == m.source_line]
    unexplained = [m for m in survivors if m not in equivalent and m not in accepted]
    total = len(results)
    scored = total - len(equivalent)
    score = killed / scored if scored else 1.0
    lines = [
        f"# Mutation testing: `{path}`",
        "",
        f"Tests: {' '.join(f'`{t}`' for t in args.tests)} (`pytest -x`, {args.timeout:.0f} s per mutant)",
        f"Run: {time.strftime('%Y-%m-%d')}, {elapsed / 60:.1f} min for {total} mutants "
        f"({elapsed / max(total, 1):.1f} s each)"
        + (f"; resumed: only the survivors of {Path(args.resume).name} were rerun" if args.resume else
           "; from scratch"),
        "",
        "| mutants | killed (incl. timeouts) | survived | equivalent | accepted | unexplained | score |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {total} | {killed} | {len(survivors)} | {len(equivalent)} | {len(accepted)} | "
        f"{len(unexplained)} | {score:.1%} |",
        "",
        "Score = killed / (mutants - equivalent). Timeouts: "
        f"{sum(1 for _, o in results if o == 'timeout')}.",
        "",
        "## Survivors",
        "",
    ]
    for m in survivors:
        note = notes.get(m.id, {})
        kind = note.get("kind", "UNEXPLAINED") if note.get("line") == m.source_line else "UNEXPLAINED"
        lines.append(f"- `{m.id}` `{m.source_line}` - **{kind}**: {note.get('why', '')}".rstrip(": "))
    lines += ["", "## Killed", "", ", ".join(f"`{m.id}`" for m, o in results if o != "survived"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
