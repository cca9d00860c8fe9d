"""Self-test of one artifact: golden inputs give their expected top-1 through the real runtime.

Used by ``edgefleet agent selftest`` and by the updater before a new model may serve (issue 4): the
outputs must be finite probabilities, every golden input must reproduce its expected top-1, the
artifact must reach the package's agreement floor against its fp32 references on this CPU (the same
check that decides which artifacts may serve, :mod:`edge_agent.agreement`), and the median latency must
be within the budget when one is given.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge_agent.agreement import load_check, measure_agreement
from edge_agent.backends.base import Backend, BackendOptions, available_runtimes, load_backend
from edge_agent.package import ModelPackage, load_package
from edge_agent.postprocess import to_probabilities
from edge_agent.preprocess import Preprocessor


@dataclass
class SelfTestResult:
    artifact: str
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    latency_ms: float | None = None
    golden: int = 0
    agreement: float | None = None
    completed: bool = True
    """False when the test itself did not finish: the child process hung past its deadline or died."""

    def fail(self, why: str) -> None:
        self.passed = False
        self.failures.append(why)

    def summary(self) -> str:
        lat = f"{self.latency_ms:.1f} ms" if self.latency_ms is not None else "n/a"
        head = f"{self.golden} golden inputs, median latency {lat}"
        if self.agreement is not None:
            head += f", fp32 agreement {self.agreement:.1%}"
        return head if self.passed else head + "; " + "; ".join(self.failures)


def self_test(
    package: ModelPackage,
    artifact: str,
    *,
    backend: Backend | None = None,
    options: BackendOptions | None = None,
    latency_budget_ms: float | None = None,
    repeats: int = 3,
) -> SelfTestResult:
    """Run every golden input of ``package`` through ``artifact`` and check the results."""
    result = SelfTestResult(artifact=artifact)
    m = package.manifest
    if not m.golden:
        result.fail("package has no golden inputs")
        return result
    try:
        b = backend or load_backend(package, artifact, options)
    except Exception as exc:  # noqa: BLE001 - any load failure fails the test
        result.fail(f"cannot load: {exc}")
        return result
    times: list[float] = []
    try:
        _check_golden(package, artifact, b, result, times, repeats)
        check = load_check(package)
        if check is not None:
            agreement = measure_agreement(package, artifact, check, backend=b)
            result.agreement = agreement.agreement
            if not agreement.eligible:
                result.fail(agreement.describe())
    except Exception as exc:  # noqa: BLE001 - a runtime error is a failed self-test, not a crash
        result.fail(f"runtime error: {type(exc).__name__}: {exc}")
    finally:
        if backend is None:
            b.close()
    if times:
        result.latency_ms = float(np.median(times))
        if latency_budget_ms is not None and result.latency_ms > latency_budget_ms:
            result.fail(
                f"median latency {result.latency_ms:.1f} ms exceeds budget {latency_budget_ms:.1f} ms"
            )
    return result


def _check_golden(
    package: ModelPackage, artifact: str, b: Backend, result: SelfTestResult, times: list[float], repeats: int
) -> None:
    """Each golden input: a finite probability distribution whose top-1 is the recorded one; ``times``
    collects the milliseconds of every run."""
    m = package.manifest
    pre = Preprocessor(m.preprocess, m.artifacts[artifact].input)
    for g in m.golden:
        image = cv2.imread(str(package.path(g.file)), cv2.IMREAD_COLOR)
        if image is None:
            result.fail(f"{g.file}: cannot decode golden input")
            continue
        x, _ = pre(image)
        probs = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            raw = b.run(x)
            times.append((time.perf_counter() - t0) * 1000)
            probs = to_probabilities(raw, m.output_kind, m.temperature)[0]
        result.golden += 1
        assert probs is not None  # repeats >= 1
        if not np.isfinite(probs).all():
            result.fail(f"{g.file}: output is not finite")
            continue
        if abs(float(probs.sum()) - 1.0) > 1e-3 or probs.min() < 0:
            result.fail(f"{g.file}: output is not a probability distribution (sum {probs.sum():.4f})")
            continue
        top1 = int(probs.argmax())
        if top1 != g.expected_top1:
            result.fail(
                f"{g.file}: top-1 {top1} ({m.labels[top1]}), expected {g.expected_top1} ({m.labels[g.expected_top1]})"
            )


def runnable_artifacts(package: ModelPackage) -> list[str]:
    """The package's artifacts whose runtime is installed here, in manifest order."""
    runtimes = available_runtimes()
    return [k for k, a in package.manifest.artifacts.items() if a.runtime in runtimes]


def self_test_in_child(
    package_dir: str | Path,
    artifact: str,
    *,
    options: BackendOptions | None = None,
    latency_budget_ms: float | None = None,
    deadline_s: float = 120.0,
) -> SelfTestResult:
    """:func:`self_test` in a child process killed after ``deadline_s``: a model whose inference never
    returns, or that crashes the runtime, fails (``completed`` False) instead of hanging or killing us."""
    spec = {"options": options.model_dump(mode="json") if options else None, "budget": latency_budget_ms}
    cmd = [sys.executable, "-m", "edge_agent.selftest", str(package_dir), artifact, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline_s)
    except subprocess.TimeoutExpired:
        return _unfinished(artifact, f"no result within {deadline_s:.0f} s (inference does not return)")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return _unfinished(artifact, f"the self-test process died (exit {proc.returncode}): {tail[0][:300]}")
    return SelfTestResult(**json.loads(lines[-1]))


def _unfinished(artifact: str, why: str) -> SelfTestResult:
    result = SelfTestResult(artifact=artifact, completed=False)
    result.fail(why)
    return result


def _child_main(argv: list[str]) -> int:
    """``python -m edge_agent.selftest PACKAGE ARTIFACT SPEC``: one self-test, its result as JSON."""
    package_dir, artifact, spec_text = argv
    spec = json.loads(spec_text)
    options = BackendOptions.model_validate(spec["options"]) if spec["options"] else None
    result = self_test(load_package(package_dir), artifact, options=options, latency_budget_ms=spec["budget"])
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
