"""`make bench`: every benchmark in one run; JSON under bench/results/ and a printed table each.

Benchmarks are measured, never asserted: each compares against its baseline in the same run
(bare runtime loop vs agent pipeline, raw MQTT vs ingest, ...). Slow benchmarks live here, not in
`make test`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PACKAGE = ROOT / "build" / "models" / "lite0"

# name -> module with main(); each writes its own JSON under bench/results/ and prints a table
EXTRA = {
    "int8": "bench.int8_bench",
    "ort_int8": "bench.ort_int8",
    "litert_avx2": "bench.litert_avx2",
    "retrain_recovery": "bench.retrain_recovery",
    "train": "bench.train_bench",
    "tuf_fanout": "bench.tuf_fanout",
    "ingest": "bench.ingest_bench",
    "drift": "bench.drift_bench",
    "accuracy": "bench.accuracy_bench",
    "demo": "bench.demo_bench",
    "fuzz": "bench.fuzz_bench",
    "soak": "bench.soak_bench",
    "console": "bench.console_bench",
    "fleet_load": "bench.fleet_load_bench",
}


def _agent(seconds: float) -> None:
    from edge_agent.bench import format_table, run_bench
    from trainer.ops.broker import MosquittoBroker
    from trainer.sim.demo_photos import ensure_package

    ensure_package(PACKAGE)
    with MosquittoBroker(ROOT / "build" / "bench-broker") as broker:
        result = run_bench(PACKAGE, threads=1, seconds=seconds, broker=broker.url)
    (RESULTS / "agent.json").write_text(json.dumps(result, indent=2))
    print(format_table(result), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", help="comma-separated subset: agent," + ",".join(EXTRA))
    ap.add_argument("--seconds", type=float, default=9.0, help="agent bench: seconds per artifact and mode")
    args = ap.parse_args()
    wanted = set(args.only.split(",")) if args.only else {"agent", *EXTRA}
    RESULTS.mkdir(parents=True, exist_ok=True)
    failures = run_benches([n for n in ["agent", *EXTRA] if n in wanted], EXTRA, args.seconds)
    print(f"\nresults in {RESULTS}")
    if failures:
        print(f"benchmarks failed: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


def run_benches(names: Sequence[str], modules: Mapping[str, str], seconds: float) -> list[str]:
    """Run each bench in turn whatever the others did; the names of those that raised or returned a
    non-zero exit code (a soak that lost windows, a fuzz target that crashed), so `make bench` fails."""
    failures = []
    for name in names:
        print(f"\n=== bench: {name} ===", flush=True)
        t0 = time.time()
        try:
            if name == "agent":
                _agent(seconds)
                code = 0
            else:
                try:
                    module = importlib.import_module(modules[name])
                except ModuleNotFoundError as exc:
                    print(f"(skipped: {exc})")
                    continue
                code = module.main([]) if _takes_argv(module) else module.main()
        except Exception as exc:  # noqa: BLE001 - report and continue with the other benchmarks
            failures.append(name)
            print(f"bench {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            if isinstance(code, int) and code != 0:  # some return their results instead of a code
                failures.append(name)
                print(f"bench {name} failed: exit code {code}", file=sys.stderr)
        print(f"(bench {name}: {time.time() - t0:.0f} s)", flush=True)
    return failures


def _takes_argv(module: object) -> bool:
    import inspect

    try:
        return len(inspect.signature(module.main).parameters) > 0  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
