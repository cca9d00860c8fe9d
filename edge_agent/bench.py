"""``edgefleet agent bench``: a bare runtime loop vs the full agent pipeline, per artifact, side by side.

Both modes run on the same pre-decoded 640x480 frames with the same thread count, alternating in
rounds so that machine noise hits both equally:

* bare: ``backend.run`` on tensors preprocessed before timing starts (the ceiling of the runtime);
* pipeline: the agent's real path: frame -> preprocessing + input statistics (own thread) ->
  runtime (own thread) -> probabilities -> output features -> telemetry aggregator.

The real agent is then started as a process to measure its resident memory and its first inference
after process start (with the cached artifact choice, as on every start after the first; and cold).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from edge_agent.backends.base import BackendOptions
from edge_agent.backends.select import choose_artifact, runnable_artifacts
from edge_agent.package import ModelPackage, load_package
from edge_agent.pipeline import LoadedModel, Pipeline
from edge_agent.sources.base import EndOfStream
from edge_agent.sources.memory import MemorySource
from edge_agent.state import AgentState
from edge_agent.telemetry.aggregator import FrameResult, TelemetryAggregator
from edge_agent.telemetry.features import output_features


def bench_frames(package: ModelPackage, count: int = 32) -> list[np.ndarray]:
    """640x480 camera-like frames cut from the package's golden inputs (real photographs)."""
    rng = np.random.default_rng(0)
    decoded = [cv2.imread(str(package.path(g.file)), cv2.IMREAD_COLOR) for g in package.manifest.golden]
    images: list[np.ndarray] = [i for i in decoded if i is not None]
    if not images:
        images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)]
    frames = []
    for i in range(count):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        s = rng.uniform(0.6, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        frames.append(cv2.resize(img[y : y + ch, x : x + cw], (640, 480), interpolation=cv2.INTER_AREA))
    return frames


def _bare(package: ModelPackage, key: str, frames: list[np.ndarray], options: BackendOptions, seconds: float):
    model = LoadedModel.load(package, key, options)
    tensors = [model.preprocessor(f)[0] for f in frames]
    for t in tensors[:3]:
        model.backend.run(t)
    lat = []
    n = 0
    t_end = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        model.backend.run(tensors[n % len(tensors)])
        lat.append(time.perf_counter() - t0)
        n += 1
    elapsed = time.perf_counter() - start
    model.close()
    return n / elapsed, lat


def _pipeline(
    package: ModelPackage, key: str, frames: list[np.ndarray], options: BackendOptions, seconds: float
):
    model = LoadedModel.load(package, key, options)
    source = MemorySource(frames, passes=1_000_000).start()
    agg = TelemetryAggregator(
        fleet="bench",
        device="bench",
        session=1,
        model=model.ref,
        agent_version="bench",
        edges=package.manifest.telemetry_edges,
        now=time.time(),
        window_seconds=10.0,
    )
    pipe = Pipeline(source, model, batch=options.batch).start()
    lat: list[float] = []
    n = 0
    warm = 5
    start = t_end = 0.0
    while True:
        try:
            results = pipe.results(timeout=1.0)
        except EndOfStream:
            break
        now = time.perf_counter()
        for r in results:
            (f,) = output_features(r.probs)
            agg.add(FrameResult(output=f, inputs=r.inputs, latency_ms=r.latency_ms))
            if warm:
                warm -= 1
                if not warm:
                    start = time.perf_counter()
                    t_end = start + seconds
                continue
            n += 1
            lat.append(time.time() - r.ts)
        if agg.is_due(time.time()):
            agg.close(time.time())
        if start and now >= t_end:
            break
    elapsed = time.perf_counter() - start
    pipe.stop()
    source.close()
    model.close()
    return n / elapsed, lat


def _watch_agent(proc: subprocess.Popen[bytes], seconds: float) -> tuple[float | None, str, str]:
    """(first-inference time it logged, its log tail, /proc status after ``seconds`` more of running)."""
    first = None
    t0 = time.time()
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    buf = ""
    while time.time() - t0 < 60 and first is None and proc.poll() is None:
        with contextlib.suppress(BlockingIOError):  # the raw fd: a non-blocking text stream raises TypeError
            buf += os.read(fd, 65536).decode(errors="replace")
        m = re.search(r"first inference ([0-9.]+) s after process start", buf)
        if m:
            first = float(m.group(1))
        time.sleep(0.02)
    end = time.time() + seconds
    while (
        first is not None and time.time() < end and proc.poll() is None
    ):  # drain stderr: never block the agent
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            chunk = None
        if chunk:
            buf = (buf + chunk.decode(errors="replace"))[-20000:]
        else:
            time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(
            f"the agent exited (code {proc.returncode}) during the measurement:\n{buf[-2000:]}"
        )
    return first, buf, Path(f"/proc/{proc.pid}/status").read_text()


def _agent_process(
    package: Path, artifact: str | None, broker: str | None, state_dir: Path, seconds: float
) -> dict:
    """Start the real agent; return its first-inference time and peak/steady RSS."""
    cmd = [
        sys.executable,
        "-m",
        "edge_agent.cli",
        "agent",
        "run",
        "--package",
        str(package),
        "--source",
        "synthetic:?fps=30",
        "--device-id",
        "bench",
        "--fleet",
        "bench",
        "--state-dir",
        str(state_dir),
        "--broker",
        broker or "mqtt://127.0.0.1:9",
        "--window-seconds",
        "2",
    ]
    if artifact:
        cmd += ["--artifact", artifact]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    try:  # whatever happens, the agent is stopped: a leftover agent would skew every later measurement
        first, buf, status = _watch_agent(proc, seconds)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rss = re.search(r"VmRSS:\s+(\d+) kB", status)
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
    if first is None:
        raise RuntimeError(f"agent did not report a first inference:\n{buf[-2000:]}")
    return {
        "first_inference_s": first,
        "rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
        "peak_rss_mb": round(int(hwm.group(1)) / 1024, 1) if hwm else None,
    }


def run_bench(
    package_dir: Path,
    *,
    threads: int = 1,
    seconds: float = 5.0,
    artifacts: list[str] | None = None,
    broker: str | None = None,
    rounds: int = 3,
) -> dict:
    package = load_package(package_dir)
    options = BackendOptions(threads=threads)
    frames = bench_frames(package)
    keys = artifacts or runnable_artifacts(package)
    results = {key: _bench_artifact(package, key, frames, options, seconds, rounds) for key in keys}
    with tempfile.TemporaryDirectory() as tmp:
        state = AgentState(Path(tmp) / "state")
        choice = choose_artifact(package, "auto", options, state)
        cold = _agent_process(package_dir, None, broker, Path(tmp) / "cold", 3.0)
        warm_dir = Path(tmp) / "warm"
        shutil.copytree(Path(tmp) / "cold", warm_dir)  # has the cached choice: a normal restart
        warm = _agent_process(package_dir, None, broker, warm_dir, 5.0)
    int8_vs_fp32 = {}
    for key in results:
        if key.endswith("-int8") and key.replace("-int8", "-fp32") in results:
            fp32 = results[key.replace("-int8", "-fp32")]
            int8_vs_fp32[key] = round(results[key]["bare_fps"] / fp32["bare_fps"], 2)
    return {
        "package": {
            "name": package.manifest.name,
            "version": package.manifest.version,
            "sha256": package.sha256,
        },
        "threads": threads,
        "frames": "640x480 crops of the package's golden photographs, pre-decoded",
        "artifacts": results,
        "int8_speedup_vs_fp32": int8_vs_fp32,
        "chosen": choice.artifact,
        "choice_timings_ms": choice.timings_ms,
        "rss_mb": warm["rss_mb"],
        "peak_rss_mb": warm["peak_rss_mb"],
        "first_inference_s": warm["first_inference_s"],
        "first_inference_cold_s": cold["first_inference_s"],
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
    }


def _bench_artifact(
    package: ModelPackage,
    key: str,
    frames: list[np.ndarray],
    options: BackendOptions,
    seconds: float,
    rounds: int,
) -> dict:
    """One artifact bare (runtime alone) and in the agent's pipeline, alternating ``rounds`` times so
    that noise hits both modes alike."""
    bare_fps, pipe_fps, bare_lat, pipe_lat = [], [], [], []
    for _ in range(rounds):
        f, lat = _bare(package, key, frames, options, seconds / rounds)
        bare_fps.append(f)
        bare_lat += lat
        f, lat = _pipeline(package, key, frames, options, seconds / rounds)
        pipe_fps.append(f)
        pipe_lat += lat
    b, p = float(np.median(bare_fps)), float(np.median(pipe_fps))
    art = package.manifest.artifacts[key]
    print(
        f"  {key:12s} bare {b:7.1f} fps  pipeline {p:7.1f} fps  ratio {p / b:.3f}",
        file=sys.stderr,
        flush=True,
    )
    return {
        "bare_fps": round(b, 2),
        "pipeline_fps": round(p, 2),
        "ratio": round(p / b, 3),
        "p50_ms": round(float(np.percentile(pipe_lat, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(pipe_lat, 99)) * 1000, 2),
        "bare_p50_ms": round(float(np.percentile(bare_lat, 50)) * 1000, 2),
        "bare_p99_ms": round(float(np.percentile(bare_lat, 99)) * 1000, 2),
        "top1_agreement": art.top1_agreement,
        "top1_agreement_confident": art.top1_agreement_confident,
    }


def format_table(r: dict) -> str:
    rows = ["artifact      bare fps  pipeline fps  ratio  p50 ms  p99 ms  top-1 agreement (all / confident)"]
    for k, v in r["artifacts"].items():
        agree = (
            f"{v['top1_agreement']:.1%} / {v['top1_agreement_confident']:.1%}"
            if v["top1_agreement"] is not None
            else "n/a"
        )
        rows.append(
            f"{k:12s} {v['bare_fps']:9.1f} {v['pipeline_fps']:13.1f} {v['ratio']:6.3f} {v['p50_ms']:7.2f} {v['p99_ms']:7.2f}  {agree}"
        )
    rows.append(f"int8 speed-up vs fp32 (bare): {r['int8_speedup_vs_fp32']}")
    rows.append(
        f"chosen: {r['chosen']}  agent RSS {r['rss_mb']} MB (peak {r['peak_rss_mb']} MB)  first inference "
        f"{r['first_inference_s']:.2f} s (cold start with artifact timing: {r['first_inference_cold_s']:.2f} s)"
    )
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    arts = [a.strip() for a in args.artifacts.split(",")] if args.artifacts else None
    r = run_bench(
        Path(args.package),
        threads=args.threads,
        seconds=args.seconds,
        artifacts=arts,
        broker=getattr(args, "broker", None),
    )
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(r, indent=2))
    print(format_table(r))
    return 0
