"""Fail when a function in edge_agent/ or trainer/ is longer than MAX_LINES (run by ``make lint``).

A long function hides its steps; split it into named steps that each return a value (see
docs/architecture.md).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 60
ROOTS = ("edge_agent", "trainer")


def function_lengths(root: Path) -> dict[str, int]:
    """``path:line:function`` -> lines, for every function and method under ``root``."""
    out: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out[f"{path.as_posix()}:{node.lineno}:{node.name}"] = (
                    (node.end_lineno or node.lineno) - node.lineno + 1
                )
    return out


def main() -> int:
    long = {k: n for root in ROOTS for k, n in function_lengths(Path(root)).items() if n > MAX_LINES}
    for key, lines in sorted(long.items()):
        print(f"{key}: {lines} lines (limit {MAX_LINES}); split it into named steps")
    if not long:
        print(f"function lengths ok (every function in {', '.join(ROOTS)} within {MAX_LINES} lines)")
    return 1 if long else 0


if __name__ == "__main__":
    sys.exit(main())
