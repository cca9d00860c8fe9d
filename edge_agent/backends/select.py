"""Pick the artifact to run: the one the config forces, or the fastest one measured on this device.

On the first start with a package every runnable artifact is timed for a moment in a child process
(so runtimes that are not chosen never occupy the agent's memory, and an artifact that crashes its
runtime cannot take the agent down); the result is cached in the state directory per package and
backend options, so later starts are immediate.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge_agent.backends.base import BackendOptions, load_backend, runtime_available
from edge_agent.errors import BackendError
from edge_agent.package import ModelPackage, load_package
from edge_agent.preprocess import Preprocessor
from edge_agent.protocol import BackendChoice
from edge_agent.state import AgentState

log = logging.getLogger(__name__)


def runnable_artifacts(package: ModelPackage) -> list[str]:
    return [k for k, a in package.manifest.artifacts.items() if runtime_available(a.runtime)]


def time_artifacts(
    package: ModelPackage, options: BackendOptions, seconds: float = 0.3, keys: list[str] | None = None
) -> dict[str, float | str]:
    """Median milliseconds per frame of each artifact (or the error that stopped it), in this process."""
    rng = np.random.default_rng(0)
    h, w = package.manifest.preprocess.size
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out: dict[str, float | str] = {}
    for key in keys or runnable_artifacts(package):
        try:
            backend = load_backend(package, key, options)
            x = Preprocessor(package.manifest.preprocess, package.manifest.artifacts[key].input).to_tensor(
                image
            )
            if options.batch > 1:
                x = np.concatenate([x] * options.batch)
            for _ in range(2):
                backend.run(x)
            times: list[float] = []
            deadline = time.perf_counter() + seconds
            while len(times) < 5 or time.perf_counter() < deadline:
                t0 = time.perf_counter()
                backend.run(x)
                times.append((time.perf_counter() - t0) * 1000 / options.batch)
            out[key] = round(float(np.median(times)), 3)
            backend.close()
        except Exception as exc:  # noqa: BLE001 - a broken artifact is reported, not fatal
            out[key] = f"{type(exc).__name__}: {exc}"
    return out


def _time_in_child(package: ModelPackage, options: BackendOptions, seconds: float) -> dict[str, float | str]:
    cmd = [
        sys.executable,
        "-m",
        "edge_agent.backends.select",
        str(package.root),
        "--threads",
        str(options.threads),
        "--batch",
        str(options.batch),
        "--seconds",
        str(seconds),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise BackendError(f"timing artifacts of {package.root} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def choose_artifact(
    package: ModelPackage,
    requested: str,
    options: BackendOptions,
    state: AgentState | None = None,
    seconds: float = 0.3,
) -> BackendChoice:
    """The artifact to run and why: forced by config, cached from an earlier start, or timed now."""
    arts = package.manifest.artifacts
    if requested != "auto":
        if requested not in arts:
            raise BackendError(
                f"{package.root}: config forces artifact {requested!r}, package has {sorted(arts)}"
            )
        if not runtime_available(arts[requested].runtime):
            raise BackendError(
                f"artifact {requested!r} needs runtime {arts[requested].runtime!r}, not installed"
            )
        return BackendChoice(artifact=requested, runtime=arts[requested].runtime, forced=True)
    if not runnable_artifacts(package):
        runtimes = sorted({a.runtime for a in arts.values()})
        raise BackendError(
            f"{package.root}: no installed runtime can run this package (needs one of {runtimes})"
        )
    key = f"{package.sha256}:{options.threads}:{options.batch}"
    cached = state.cached_choice(key) if state else None
    if cached and cached.get("artifact") in arts:
        return BackendChoice.model_validate(cached)
    t0 = time.perf_counter()
    timings = _time_in_child(package, options, seconds)
    fast = {k: v for k, v in timings.items() if isinstance(v, float)}
    for k, v in timings.items():
        if not isinstance(v, float):
            log.warning("artifact %s cannot run here: %s", k, v)
    if not fast:
        raise BackendError(f"{package.root}: no artifact could run: {timings}")
    best = min(fast, key=lambda k: fast[k])
    choice = BackendChoice(artifact=best, runtime=arts[best].runtime, timings_ms=fast)
    log.info(
        "timed %d artifacts in %.1f s: %s; chose %s",
        len(timings),
        time.perf_counter() - t0,
        ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(fast.items(), key=lambda kv: kv[1])),
        best,
    )
    if state:
        state.store_choice(key, choice.model_dump())
    return choice


def _main() -> None:
    ap = argparse.ArgumentParser(description="time every runnable artifact of a package (JSON on stdout)")
    ap.add_argument("package", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.3)
    a = ap.parse_args()
    pkg = load_package(a.package, verify=False)  # the parent verified it
    print(json.dumps(time_artifacts(pkg, BackendOptions(threads=a.threads, batch=a.batch), a.seconds)))


if __name__ == "__main__":
    _main()
