"""Fail when a function in edge_agent/ or trainer/ grows past MAX_LINES (run by ``make lint``).

Functions that were longer before the check existed are listed in KNOWN_LONG with the length they
may not exceed; each is a split still to do (see docs/architecture.md), and the list only shrinks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 60
ROOTS = ("edge_agent", "trainer")

KNOWN_LONG: dict[str, int] = {
    "trainer/evaluation/data_check.py:check_dataset": 153,
    "trainer/evaluation/card.py:render_card": 130,
    "trainer/sim/demo.py:run_demo": 122,
    "trainer/model/fit.py:fit_suffix": 104,
    "edge_agent/sources/registry.py:open_source": 83,
    "edge_agent/agent.py:run": 82,
    "trainer/store/ingest_writes.py:write_statuses": 72,
    "edge_agent/bench.py:run_bench": 71,
    "edge_agent/selftest.py:self_test": 66,
    "trainer/sim/demo.py:_measure": 61,
}


def function_lengths(root: Path) -> dict[str, int]:
    """``path:function`` -> lines, for every function and method under ``root``."""
    out: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                key = f"{path.as_posix()}:{node.name}"
                out[key] = max(out.get(key, 0), (node.end_lineno or node.lineno) - node.lineno + 1)
    return out


def main() -> int:
    problems = []
    for root in ROOTS:
        for key, lines in function_lengths(Path(root)).items():
            limit = KNOWN_LONG.get(key, MAX_LINES)
            if lines > limit:
                problems.append(f"{key}: {lines} lines (limit {limit}); split it into named steps")
    stale = [
        k for k, v in KNOWN_LONG.items() if function_lengths(Path(k.split("/")[0])).get(k, 0) <= MAX_LINES
    ]
    problems += [f"{k}: now within {MAX_LINES} lines; remove it from KNOWN_LONG" for k in stale]
    print(
        "\n".join(problems) or f"function lengths ok (limit {MAX_LINES}, {len(KNOWN_LONG)} known exceptions)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
