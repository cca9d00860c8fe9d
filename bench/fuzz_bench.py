"""`python -m bench.fuzz_bench`: atheris (coverage-guided libFuzzer) on every fuzz target, bounded in time.

Each target of ``tests/fuzz_targets.py`` runs in its own process for ``--seconds``, starting from a
copy of its kept inputs (``tests/fuzz_corpus/<target>/``). A crash (an exception other than the
target's documented refusal) stops that target; its input is kept as
``tests/fuzz_corpus/<target>/crash-<sha1>`` so ``make test`` replays it for good. Results:
``bench/results/fuzz.json`` and a table (executions, executions/s over the fuzzing time, crashes per
target; wall time includes instrumenting every loaded module first).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _fuzz_one(name: str, seconds: float, work: Path) -> int:
    """In the child process: instrument, then fuzz ``name`` until the time is up or it crashes."""
    import atheris

    from tests.fuzz_targets import CORPUS, TARGETS

    atheris.instrument_all()  # every module imported so far, targets and parsers included
    corpus = work / "corpus"
    shutil.copytree(CORPUS / name, corpus)
    argv = [
        "fuzz",
        str(corpus),
        f"-max_total_time={max(1, int(seconds))}",
        f"-artifact_prefix={work}/",
        "-print_final_stats=1",
        "-rss_limit_mb=4096",
        "-timeout=20",
    ]
    target = TARGETS[name]
    atheris.Setup(argv, target)
    atheris.Fuzz()
    return 0


def _run(name: str, seconds: float) -> dict:
    """Fuzz one target in a child process; keep what crashed it in the corpus."""
    from tests.fuzz_targets import CORPUS

    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as d:
        work = Path(d)
        t0 = time.time()
        cmd = [
            sys.executable,
            "-m",
            "bench.fuzz_bench",
            "--child",
            name,
            "--seconds",
            str(seconds),
            "--work",
            d,
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 300)
        elapsed = time.time() - t0
        execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
        crashes = []
        for f in sorted(work.glob("crash-*")) + sorted(work.glob("timeout-*")) + sorted(work.glob("oom-*")):
            kept = CORPUS / name / f.name
            shutil.copyfile(f, kept)
            crashes.append(str(kept.relative_to(ROOT)))
        problem = ""
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "Exception" in ln]
            problem = (lines[-1] if lines else proc.stderr.strip().splitlines()[-1:] or ["?"])[0][:300]
        n = int(execs.group(1)) if execs else 0
        return {
            "target": name,
            "seconds": seconds,
            "wall_seconds": round(elapsed, 1),
            "executions": n,
            "executions_per_s": round(n / seconds),
            "crashes": crashes,
            "problem": problem,
            "exit_code": proc.returncode,
        }


def format_table(results: list[dict]) -> str:
    head = f"{'target':<14} {'fuzzing s':>9} {'wall s':>7} {'executions':>11} {'exec/s':>8}  crashes"
    rows = [
        f"{r['target']:<14} {r['seconds']:>9.0f} {r['wall_seconds']:>7.0f} {r['executions']:>11} {r['executions_per_s']:>8}  "
        + (", ".join(r["crashes"]) or "none")
        + (f" ({r['problem']})" if r["problem"] else "")
        for r in results
    ]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60.0, help="fuzzing time per target")
    ap.add_argument("--only", help="comma-separated targets")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _fuzz_one(args.child, args.seconds, Path(args.work))
    from bench.accuracy_bench import cpu_flags
    from tests.fuzz_targets import TARGETS

    names = args.only.split(",") if args.only else sorted(TARGETS)
    results = []
    for name in names:
        print(f"fuzzing {name} for {args.seconds:.0f} s ...", flush=True)
        results.append(_run(name, args.seconds))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"machine": {"cpu_flags": cpu_flags()}, "seconds_per_target": args.seconds, "targets": results}
    (RESULTS / "fuzz.json").write_text(json.dumps(out, indent=2))
    print(format_table(results), flush=True)
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
