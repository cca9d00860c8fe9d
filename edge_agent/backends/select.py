"""Pick the artifact to run: the one the config forces, or the fastest one that is right on this device.

On the first start with a package every runnable artifact is first checked against the package's fp32
references (:mod:`edge_agent.agreement`; an artifact below the package's floor is excluded and the reason
reported in ``Status.backend``), then the eligible ones are timed, interleaved, in a child process
(so runtimes that are not chosen never occupy the agent's memory, and an artifact that crashes its
runtime cannot take the agent down); the result is cached in the state directory per package and
backend options, so later starts are immediate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.agreement import AgreementResult, load_check, measure_agreement
from edge_agent.backends.base import Backend, BackendOptions, load_backend, runtime_available
from edge_agent.errors import BackendError
from edge_agent.package import ModelPackage, load_package
from edge_agent.preprocess import Preprocessor
from edge_agent.protocol import BackendChoice
from edge_agent.state import AgentState

log = logging.getLogger(__name__)


def runnable_artifacts(package: ModelPackage) -> list[str]:
    return [k for k, a in package.manifest.artifacts.items() if runtime_available(a.runtime)]


def time_artifacts(
    package: ModelPackage,
    options: BackendOptions,
    seconds: float = 0.3,
    keys: list[str] | None = None,
    rounds: int = 5,
) -> dict[str, float | str]:
    """Median milliseconds per frame of each artifact (or the error that stopped it), in this process.

    The artifacts are timed interleaved: ``rounds`` rounds, each running every artifact for a short
    burst in a rotating order, and the median over all bursts is kept. A neighbour that burns CPU for
    part of the time slows every artifact alike instead of the one that happened to run then.
    """
    rng = np.random.default_rng(0)
    h, w = package.manifest.preprocess.size
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out: dict[str, float | str] = {}
    loaded: dict[str, tuple[Backend, np.ndarray]] = {}
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
            loaded[key] = (backend, x)
        except Exception as exc:  # noqa: BLE001 - a broken artifact is reported, not fatal
            out[key] = f"{type(exc).__name__}: {exc}"
    times: dict[str, list[float]] = {k: [] for k in loaded}
    burst = seconds / max(1, rounds)
    order = list(loaded)
    try:
        for r in range(rounds):
            for key in order[r % len(order) :] + order[: r % len(order)] if order else []:
                backend, x = loaded[key]
                deadline = time.perf_counter() + burst
                n = 0
                while n < 2 or time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    backend.run(x)
                    times[key].append((time.perf_counter() - t0) * 1000 / options.batch)
                    n += 1
    except Exception as exc:  # noqa: BLE001
        for key in loaded:
            out.setdefault(key, f"{type(exc).__name__}: {exc}")
    finally:
        for backend, _ in loaded.values():
            backend.close()
    for key, t in times.items():
        if key not in out:
            out[key] = round(float(np.median(t)), 3)
    return out


def check_artifacts(
    package: ModelPackage, options: BackendOptions, keys: list[str] | None = None
) -> dict[str, AgreementResult | str]:
    """Agreement of each artifact with the package's fp32 references on this CPU (empty without a check)."""
    check = load_check(package)
    if check is None:
        return {}
    out: dict[str, AgreementResult | str] = {}
    for key in keys or runnable_artifacts(package):
        try:
            out[key] = measure_agreement(package, key, check, options=options)
        except Exception as exc:  # noqa: BLE001 - an artifact that cannot run is not eligible
            out[key] = f"{type(exc).__name__}: {exc}"
    return out


def pick_fastest(timings_ms: dict[str, float], current: str | None, margin: float = 0.1) -> str:
    """The fastest artifact, except that ``current`` stays unless another is faster by more than ``margin``.

    >>> pick_fastest({"onnx-int8": 5.0, "tflite-int8": 5.2}, current="tflite-int8")
    'tflite-int8'
    >>> pick_fastest({"onnx-int8": 4.0, "tflite-int8": 5.2}, current="tflite-int8")
    'onnx-int8'
    """
    best = min(timings_ms, key=lambda k: timings_ms[k])
    if current in timings_ms and timings_ms[current] <= timings_ms[best] * (1 + margin):
        return current
    return best


def measure_artifacts(
    package: ModelPackage, options: BackendOptions, seconds: float = 0.3
) -> dict[str, dict[str, Any]]:
    """Agreement check, then interleaved timing of the eligible artifacts, in this process.

    Returns per artifact ``{"agreement": AgreementResult fields}`` and ``{"ms": float}``, or ``{"error": why}``.
    """
    out: dict[str, dict[str, Any]] = {k: {} for k in runnable_artifacts(package)}
    for key, res in check_artifacts(package, options).items():
        if isinstance(res, str):
            out[key]["error"] = res
        else:
            out[key]["agreement"] = {**dataclasses.asdict(res), "eligible": res.eligible}
    eligible = [
        k for k, v in out.items() if "error" not in v and v.get("agreement", {}).get("eligible", True)
    ]
    for key, t in time_artifacts(package, options, seconds, keys=eligible).items() if eligible else ():
        out[key]["ms" if isinstance(t, float) else "error"] = t
    return out


def _measure_in_child(
    package: ModelPackage, options: BackendOptions, seconds: float
) -> dict[str, dict[str, Any]]:
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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise BackendError(f"checking artifacts of {package.root} failed: {proc.stderr.strip()[-500:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _excluded(measured: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Why each artifact that may not serve was excluded, in one line each."""
    out = {}
    for key, v in measured.items():
        if "error" in v:
            out[key] = f"cannot run here: {v['error']}"
        elif not v.get("agreement", {}).get("eligible", True):
            a = v["agreement"]
            out[key] = (
                f"top-1 agreement with fp32 {a['agreement']:.1%} < floor {a['floor']:.1%} "
                f"on {a['inputs']} check inputs"
            )
    return out


def choose_artifact(
    package: ModelPackage,
    requested: str,
    options: BackendOptions,
    state: AgentState | None = None,
    seconds: float = 0.3,
    current: str | None = None,
) -> BackendChoice:
    """The artifact to run and why: forced by config, cached from an earlier start, or measured now.

    Measured: artifacts below the package's agreement floor on this CPU are excluded whatever their
    speed; among the rest the fastest wins, but ``current`` (the artifact serving now) stays unless
    another is clearly (over 10%) faster.
    """
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
    measured = _measure_in_child(package, options, seconds)
    excluded = _excluded(measured)
    for k, why in excluded.items():
        log.warning("artifact %s may not serve: %s", k, why)
    fast = {k: float(v["ms"]) for k, v in measured.items() if k not in excluded and "ms" in v}
    if not fast:
        raise BackendError(f"{package.root}: no artifact is eligible on this device: {excluded}")
    best = pick_fastest(fast, current)
    choice = BackendChoice(
        artifact=best,
        runtime=arts[best].runtime,
        timings_ms=fast,
        agreement={k: round(v["agreement"]["agreement"], 4) for k, v in measured.items() if "agreement" in v},
        excluded=excluded,
    )
    log.info(
        "checked and timed %d artifacts in %.1f s: %s; chose %s",
        len(measured),
        time.perf_counter() - t0,
        ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(fast.items(), key=lambda kv: kv[1])),
        best,
    )
    if state:
        state.store_choice(key, choice.model_dump())
    return choice


def _main() -> None:
    ap = argparse.ArgumentParser(
        description="check and time every runnable artifact of a package (JSON on stdout)"
    )
    ap.add_argument("package", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.3)
    a = ap.parse_args()
    pkg = load_package(a.package, verify=False)  # the parent verified it
    options = BackendOptions(threads=a.threads, batch=a.batch)
    print(json.dumps(measure_artifacts(pkg, options, a.seconds)))


if __name__ == "__main__":
    _main()
