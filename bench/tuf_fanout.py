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

Two packages (``--package tiny,real``, both by default):

* ``tiny``: a 20 KB three-class model; every device runs the whole path above, model load and
  self-test included.
* ``real``: the pretrained EfficientNet-Lite0 package cut down to what an int8 release carries
  (``model_int8.onnx``, 5.2 MB, its golden frames and agreement check: about 10 MB). Verifying a real
  model is seconds of one core per device (self-test in a child process, artifact timing, load,
  self-test), which 1,000 simulated devices cannot do at once on the 2 cores of one machine, while a
  real fleet does it on 1,000 CPUs in parallel. So the fan-out measures distribution for all devices
  (metadata, download, length/hash checks, unpack, per-file sha256, swap, commit, all real) with the
  model verification skipped, and ``--verify-sample`` more devices then run the whole path, real
  verification included, one at a time on the idle machine. The fleet's time is the fan-out's wall
  time plus the slowest sampled device: each device verifies on its own CPU after its download.
  Results: bench/results/tuf_fanout-real.json.

    python -m bench.tuf_fanout [--devices 1000] [--workers 2] [--threads 24] [--package tiny,real]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
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

from bench.accuracy_bench import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "tuf_fanout.json"
FLEET, CHANNEL = "bench", "canary"
PRETRAINED = ROOT / "build" / "models" / "lite0"
INT8 = "onnx-int8"


class _Holder:
    """A device's model slot holder: what the pipeline is to the real agent (swap at a frame boundary)."""

    def __init__(self, model: Any) -> None:
        self.active = model

    def swap(self, model: Any) -> Any:
        old, self.active = self.active, model
        return old


def _device(
    i: int, work: Path, url: str, root: Path, factory: Path, current: Any, verify: bool = True
) -> dict[str, Any]:
    """One simulated device: boot, one update check, and the outcome. ``verify=False`` skips only the
    model load and self-tests of the staged package (everything before and after them runs)."""
    from edge_agent.config import UpdateSettings
    from edge_agent.updater.boot import select_boot
    from edge_agent.updater.store import UpdateStore
    from edge_agent.updater.updater import Identity, Updater

    class _DistributionOnly(Updater):
        def _verify(self, pkg: Any, info: Any) -> Any:
            return current  # the staged package's files are already checked; its model is not loaded

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
    kind = Updater if verify else _DistributionOnly
    up = kind(
        settings, Identity(FLEET, f"dev{i:05d}", 1, current.artifact), store, boot, publish=events.append
    )
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


def _worker(args: tuple[list[int], str, str, str, str, int, bool]) -> dict[str, Any]:
    """A process running its share of the devices on a thread pool, all started at once."""
    ids, work, url, root, factory, threads, verify = args
    current = _current_model(Path(factory))
    t0 = time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        results = list(
            pool.map(lambda i: _device(i, Path(work), url, Path(root), Path(factory), current, verify), ids)
        )
    return {"results": results, "cpu_s": time.process_time() - t0}


def _current_model(factory: Path) -> Any:
    """The model every device serves before the release: the factory package's first artifact."""
    from edge_agent.backends.base import BackendOptions
    from edge_agent.package import load_package
    from edge_agent.pipeline import LoadedModel

    pkg = load_package(factory)
    return LoadedModel.load(pkg, next(iter(pkg.manifest.artifacts)), BackendOptions())


def int8_release_package(src: Path, out: Path, version: str) -> Path:
    """``src`` (a full package) cut down to what an int8 release carries: the ONNX int8 artifact, the
    golden frames and the agreement check, with model.json's artifacts, files and version to match."""
    from edge_agent.package import MANIFEST, FileEntry, ModelManifest, load_package, sha256_file

    manifest = load_package(src).manifest
    keep = {INT8: manifest.artifacts[INT8]}
    names = {a.file for a in keep.values()} | {g.file for g in manifest.golden}
    if manifest.agreement_check is not None:
        names.add(manifest.agreement_check.file)
    out.mkdir(parents=True)
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, out / name)
    files = {n: FileEntry(sha256=sha256_file(out / n), size=(out / n).stat().st_size) for n in sorted(names)}
    cut = ModelManifest.model_validate(
        {**manifest.model_dump(), "version": version, "artifacts": keep, "files": files}
    )
    (out / MANIFEST).write_text(json.dumps(cut.model_dump(mode="json", exclude_none=True), indent=1))
    return out


def _packages(kind: str, work: Path) -> tuple[Path, Path]:
    """The factory package every device boots and the release's package, of the given kind."""
    if kind == "tiny":
        from trainer.sim.tiny import build_tiny_package

        factory = build_tiny_package(work / "pkgs" / "v1", version="1.0.0").root
        return factory, build_tiny_package(work / "pkgs" / "v2", version="2.0.0").root
    from trainer.sim.demo_photos import ensure_package

    ensure_package(PRETRAINED)
    factory = int8_release_package(PRETRAINED, work / "pkgs" / "v1", "1.0.0")
    return factory, int8_release_package(PRETRAINED, work / "pkgs" / "v2", "2.0.0")


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


def run(
    devices: int, workers: int, threads: int, work: Path, package: str = "tiny", verify_sample: int = 0
) -> dict[str, Any]:
    """Build the repository, serve it, fan the release out, and measure."""
    from trainer.release.repository import ReleaseRepository

    repo = ReleaseRepository.init(work / "repo")
    factory, new = _packages(package, work)
    rec = repo.publish(new, channel=CHANNEL, fleet=FLEET)
    verify = package == "tiny"
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
                [(s, str(work / "devices"), url, str(root), str(factory), threads, verify) for s in shares],
            )
        wall = time.perf_counter() - t0
        cpu1 = sp.cpu_times()
        with urllib.request.urlopen(f"{url}/_stats") as r:
            stats = json.loads(r.read())
        sample = _verify_sample(range(devices, devices + verify_sample), work, url, root, factory)
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
        "package": _package_facts(package, new, rec.length),
        **_fleet_time(wall, sample),
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
        "cpu_flags": cpu_flags(),
        "per_device": "refresh (timestamp, snapshot, targets, channel role, root probe) + target download, "
        "length/hash check, unpack + per-file sha256, "
        + ("ONNX Runtime load + self-test, " if verify else "(model verification: see verify_sample), ")
        + "swap, commit",
    }


def _verify_sample(ids: range, work: Path, url: str, root: Path, factory: Path) -> list[dict[str, Any]]:
    """Devices that run the whole path, real model verification included, one at a time after the
    fan-out (the machine otherwise idle): what each device of a real fleet spends on its own CPU."""
    if not ids:
        return []
    current = _current_model(factory)
    out = []
    for i in ids:
        r = _device(i, work / "devices", url, root, factory, current, verify=True)
        out.append({k: r[k] for k in ("seconds", "active", "reason")})
    return out


def _fleet_time(wall: float, sample: list[dict[str, Any]]) -> dict[str, Any]:
    """With a verification sample: the fleet's time is the fan-out plus the slowest whole device."""
    if not sample:
        return {}
    secs = [s["seconds"] for s in sample]
    return {
        "verify_sample": {
            "devices": len(sample),
            "activated": sum(bool(s["active"]) for s in sample),
            "failures": [s["reason"] for s in sample if not s["active"]],
            "device_s": {"p50": round(statistics.median(secs), 3), "max": round(max(secs), 3)},
        },
        "fleet_s": round(wall + max(secs), 2),
    }


def _package_facts(kind: str, root: Path, archive_bytes: int) -> dict[str, Any]:
    """What was released: the kind, its files' total size and the signed archive's length."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return {"kind": kind, "files_bytes": sum(p.stat().st_size for p in files), "archive_bytes": archive_bytes}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {m: version(m) for m in ("tuf", "securesystemslib", "cryptography", "onnxruntime", "urllib3")}


def format_table(r: dict[str, Any]) -> str:
    """The printed summary."""
    lat = r["device_latency_s"]
    pkg = r["package"]
    rows = [
        (
            "package",
            f"{pkg['kind']}: {pkg['files_bytes'] / 1e6:.2f} MB of files, archive {pkg['archive_bytes']} B",
        ),
        (
            "devices activated",
            f"{r['activated']} / {r['devices']}" + (f"  failures: {r['failures']}" if r["failures"] else ""),
        ),
        ("fan-out wall time", f"{r['wall_s']:.1f} s  (target <= {r['target_wall_s']} s)"),
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
    if "verify_sample" in r:
        vs = r["verify_sample"]
        rows += [
            (
                "whole device, verified",
                f"{vs['activated']} / {vs['devices']} sampled, p50 {vs['device_s']['p50']:.2f} s, "
                f"max {vs['device_s']['max']:.2f} s (one at a time)",
            ),
            ("fleet time", f"{r['fleet_s']:.1f} s  (fan-out + slowest verified device; target <= 60 s)"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(
        ["TUF fan-out: one release to simulated devices (real HTTP, real verification)"]
        + [f"  {k:<{width}}  {v}" for k, v in rows]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--package", default="tiny,real", help="comma-separated: tiny, real (see above)")
    ap.add_argument(
        "--verify-sample", type=int, default=10, help="real package: whole devices after the fan-out"
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--threads", type=int, default=24, help="concurrent devices per worker process")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args(argv)
    incomplete = 0
    for kind in a.package.split(","):
        work = Path(tempfile.mkdtemp(prefix="tuf-fanout-"))
        try:
            sample = a.verify_sample if kind == "real" else 0
            result = run(a.devices, a.workers, a.threads, work, kind, sample)
        finally:
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
        out = Path(a.out)
        out = out.with_name(f"{out.stem}-{kind}{out.suffix}") if kind != "tiny" else out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(format_table(result), flush=True)
        print(f"results: {out}")
        incomplete += result["activated"] < result["devices"]
    return 1 if incomplete else 0


if __name__ == "__main__":
    main()
