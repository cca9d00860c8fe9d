"""Fan-out of one release to 1,000 simulated devices on one machine: real HTTP, real TUF verification.

A release repository (python-tuf Metadata API, ed25519 keys) is served by the trainer's HTTP server in
its own process. Each simulated device is the agent's real updater code path with its own pinned root,
TUF metadata cache, state directory and A/B slots: refresh metadata (timestamp, snapshot, targets, the
channel role, a probe for a newer root), check the release (counter, compatibility), download the
package archive and check its signed length and hashes, unpack it into slot B and verify every file,
load it in an ONNX Runtime session and self-test it (golden top-1, finite probabilities, latency),
hot-swap it into the device's model holder and commit (persisting every state change with fsync).
The time-based health window is skipped (``health_windows: 0``): it is wall-clock bound, not work.
Devices run as threads in worker processes (one per core by default), all at once.

Reported: wall time until every device is active, HTTP requests the server answered, the server's
CPU time, client CPU time, and per-device latency. Target (issue 4): <= 60 s for 1,000 devices on
2 cores. Results: bench/results/tuf_fanout.json and a printed table.

    python -m bench.tuf_fanout [--devices 1000] [--workers 2] [--threads 24]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "tuf_fanout.json"
FLEET, CHANNEL = "bench", "canary"


class _Holder:
    """A device's model slot holder: what the pipeline is to the real agent (swap at a frame boundary)."""

    def __init__(self, model: Any) -> None:
        self.active = model

    def swap(self, model: Any) -> Any:
        old, self.active = self.active, model
        return old


def _device(i: int, work: Path, url: str, root: Path, factory: Path, current: Any) -> dict[str, Any]:
    """One simulated device: boot, one update check, and the outcome."""
    from edge_agent.config import UpdateSettings
    from edge_agent.updater.boot import select_boot
    from edge_agent.updater.store import UpdateStore
    from edge_agent.updater.updater import Identity, Updater

    t0 = time.perf_counter()
    store = UpdateStore(work / f"dev{i:05d}" / "update")
    boot = select_boot(store, factory)
    events: list[Any] = []
    settings = UpdateSettings(
        repository=url,
        root=root,
        channel=CHANNEL,
        health_windows=0,
        latency_budget_ms=200,
        poll_seconds=0,
        http_timeout_s=60,
    )
    up = Updater(settings, Identity(FLEET, f"dev{i:05d}", 1, "onnx-fp32"), store, boot, publish=events.append)
    up.check_now(_Holder(current))
    st = up.state
    return {
        "device": i,
        "seconds": time.perf_counter() - t0,
        "active": st.committed is not None and st.committed.release > 0,
        "release": st.committed.release if st.committed else 0,
        "states": [e.state for e in events],
        "requests": up.repo.requests,
        "reason": next((e.reason for e in events if e.state == "rejected"), None),
    }


def _worker(args: tuple[list[int], str, str, str, str, int]) -> dict[str, Any]:
    """A process running its share of the devices on a thread pool, all started at once."""
    ids, work, url, root, factory, threads = args
    from edge_agent.backends.base import BackendOptions
    from edge_agent.package import load_package
    from edge_agent.pipeline import LoadedModel

    pkg = load_package(factory)
    current = LoadedModel.load(pkg, "onnx-fp32", BackendOptions())  # the model every device serves now
    t0 = time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        results = list(
            pool.map(lambda i: _device(i, Path(work), url, Path(root), Path(factory), current), ids)
        )
    return {"results": results, "cpu_s": time.process_time() - t0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("release server exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("release server did not start")


def run(devices: int, workers: int, threads: int, work: Path) -> dict[str, Any]:
    """Build the repository, serve it, fan the release out, and measure."""
    from trainer.release.repository import ReleaseRepository
    from trainer.sim.tiny import build_tiny_package

    repo = ReleaseRepository.init(work / "repo")
    factory = build_tiny_package(work / "pkgs" / "v1", version="1.0.0")
    new = build_tiny_package(work / "pkgs" / "v2", version="2.0.0")
    rec = repo.publish(new.root, channel=CHANNEL, fleet=FLEET)
    root = work / "root.json"
    root.write_bytes(repo.root_bytes())
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer.release.server",
            "--repo",
            str(repo.path),
            "--port",
            str(port),
            "--no-resign",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, server)
        url = f"http://127.0.0.1:{port}"
        sp = psutil.Process(server.pid)
        cpu0 = sp.cpu_times()
        shares = [list(range(devices))[w::workers] for w in range(workers)]
        ctx = mp.get_context("fork")
        t0 = time.perf_counter()
        with ctx.Pool(workers) as pool:
            outs = pool.map(
                _worker,
                [(s, str(work / "devices"), url, str(root), str(factory.root), threads) for s in shares],
            )
        wall = time.perf_counter() - t0
        cpu1 = sp.cpu_times()
        with urllib.request.urlopen(f"{url}/_stats") as r:
            stats = json.loads(r.read())
    finally:
        server.terminate()
        server.wait(10)
    results = [r for o in outs for r in o["results"]]
    secs = np.array([r["seconds"] for r in results])
    activated = sum(r["active"] and r["release"] == rec.release for r in results)
    server_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    failures: dict[str, int] = {}
    for r in results:
        if not r["active"]:
            key = r["reason"] or ",".join(r["states"]) or "no events"
            failures[key] = failures.get(key, 0) + 1
    return {
        "devices": devices,
        "activated": activated,
        "failures": failures,
        "wall_s": round(wall, 2),
        "devices_per_s": round(devices / wall, 1),
        "target_wall_s": 60,
        "requests_served": stats["requests"],
        "requests_by_status": stats["by_status"],
        "requests_per_device": round(stats["requests"] / devices, 2),
        "bytes_served": stats["bytes"],
        "target_bytes": rec.length,
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_share_of_wall": round(server_cpu / wall, 3),
        "client_cpu_s": round(sum(o["cpu_s"] for o in outs), 2),
        "device_latency_s": {
            "p50": round(float(np.percentile(secs, 50)), 3),
            "p95": round(float(np.percentile(secs, 95)), 3),
            "max": round(float(secs.max()), 3),
        },
        "workers": workers,
        "threads_per_worker": threads,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "versions": _versions(),
        "per_device": "refresh (timestamp, snapshot, targets, channel role, root probe) + target download, "
        "length/hash check, unpack + per-file sha256, ONNX Runtime load + self-test, swap, commit",
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {m: version(m) for m in ("tuf", "securesystemslib", "cryptography", "onnxruntime", "urllib3")}


def format_table(r: dict[str, Any]) -> str:
    """The printed summary."""
    lat = r["device_latency_s"]
    rows = [
        (
            "devices activated",
            f"{r['activated']} / {r['devices']}" + (f"  failures: {r['failures']}" if r["failures"] else ""),
        ),
        ("wall time", f"{r['wall_s']:.1f} s  (target <= {r['target_wall_s']} s)"),
        ("throughput", f"{r['devices_per_s']:.1f} devices/s"),
        (
            "requests served",
            f"{r['requests_served']}  ({r['requests_per_device']} per device) {r['requests_by_status']}",
        ),
        ("bytes served", f"{r['bytes_served'] / 1e6:.1f} MB  (target file {r['target_bytes']} B)"),
        (
            "server CPU",
            f"{r['server_cpu_s']:.1f} s  ({100 * r['server_cpu_share_of_wall']:.0f}% of one core over the run)",
        ),
        (
            "client CPU",
            f"{r['client_cpu_s']:.1f} s  ({r['workers']} processes x {r['threads_per_worker']} threads)",
        ),
        ("per-device latency", f"p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, max {lat['max']:.2f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(
        ["TUF fan-out: one release to simulated devices (real HTTP, real verification)"]
        + [f"  {k:<{width}}  {v}" for k, v in rows]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--threads", type=int, default=24, help="concurrent devices per worker process")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tuf-fanout-"))
    try:
        result = run(a.devices, a.workers, a.threads, work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(format_table(result), flush=True)
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
