"""Functions a reader can hold in mind (issue 17, item 6): none in medops/ or flows/ over 80 lines.

Length is ``end_lineno - lineno + 1`` of the ``def`` (docstring included, decorators not).
"""

from __future__ import annotations

import ast

MAX_LINES = 80
# Files being shortened on their own branches, which may still hold longer functions: drop each
# once its branch has landed (none left).
NOT_YET: tuple[str, ...] = ()


def _long_functions(repo_root) -> dict[tuple[str, str], int]:
    found = {}
    for folder in ("medops", "flows"):
        for path in sorted((repo_root / folder).rglob("*.py")):
            rel = path.relative_to(repo_root).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_LINES:
                        found[(rel, node.name)] = length
    return found


def test_no_new_function_is_over_80_lines(repo_root):
    too_long = {key: n for key, n in _long_functions(repo_root).items() if not key[0].startswith(NOT_YET)}
    assert not too_long, f"functions over {MAX_LINES} lines (file, name): lines: {too_long}"
