"""Fleet load benchmark: a simulated fleet of 10,000 devices against mosquitto and against the 3-node NATS
JetStream cluster, with the trainer's real ingest, drift step and console on PostgreSQL.

    python -m bench.fleet_load_bench                      # 10,000 devices, 60 s period, both brokers
    python -m bench.fleet_load_bench --quick --brokers mosquitto   # 500 devices, 10 s period, ~1 min
    python -m bench.fleet_load_bench --devices 2000 --period 10 --seconds 60   # a shorter, harder run

Simulated: the devices. bench/fleet_sim.py runs thousands of paho clients per process on one selector
loop (``--procs`` processes); each connects with its own client id and certificate, sets its retained
``offline`` will, publishes its retained ``online`` birth, subscribes (QoS 1) to its own status, its
commands and the stable and canary release hints as edge_agent/agent.py does, waits for its birth to
come back, then publishes pre-rendered windows (the agent's aggregator output for the tiny package's
model, trainer/sim/windows.py; one seq per device and window) every ``--period`` seconds at a phase of
its own (phases spread evenly), and a retained ``offline`` on its clean stop. No camera, no inference.

Real: the brokers (a private mosquitto with mutual TLS and deploy/mosquitto's ACL; the NATS cluster
rendered from deploy/nats by trainer/ops/nats_cluster.py, mutual TLS), per-device certificates from
trainer.ops.pki (issued once, cached under build/fleet-load/pki), the ingest workers
(``python -m trainer.cli.ingest run``, one process per worker: the MQTT shared subscription on
mosquitto, the JetStream consumer with ``--nats`` on the cluster), PostgreSQL (a fresh database per
broker, dropped afterwards), the service's drift step (``DriftService.poll`` over the stored windows,
then its health step: ``DriftService.health`` and ``put_device_health``, as ``FleetService`` runs
them) and the console (uvicorn in its own process, logged in as a viewer, server time from its
Server-Timing header).

Measured per broker: the time to connect the whole fleet (first attempt to the last device whose birth
came back, at most ``--max-pending`` connections waiting for their CONNACK per simulator process);
ingest lag from the device's publish to the row being visible in PostgreSQL (a poller reads new rows
every 0.25 s, so this is the commit time to within 0.25 s; also publish -> the worker's receive time,
``received_at``), p50/p95/max overall and per sixth of the run (bounded or growing); windows sent vs
stored (the unique key makes stored-twice impossible; the workers count the duplicates they saw); the
drift and health steps' time for the fleet; the console's fleet page and device API, first page and
a filtered, sorted page; RSS (psutil, the maximum sampled every 2 s) of the broker processes, each
ingest worker, the console and each simulator process.

Simplified: a simulated device that never gets its birth back waits for it (the agent reconnects after
``identity_check_s``), and one whose windows were never acknowledged does not resend them after the run
(``missing_acknowledged`` counts only what a device saw acknowledged and the store lacks: lost).

Not measured: inference on devices, samples and update events, release fan-out (bench/tuf_fanout.py),
the mosquitto guard plugin (client-id binding; the ACL is enforced), broker persistence to disk under
this load beyond what each broker does by default here (mosquitto autosave every 60 s as deployed;
JetStream file store), and anything across machines: everything shares this machine's cores, so the
simulator's own CPU competes with the brokers and the ingest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.accuracy_bench import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "build" / "fleet-load"
FLEET = "shop"
DB_NAME = "ef_fleet_load_bench"
PG_SERVER = os.environ.get("EDGEFLEET_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
POLL_S = 0.25


def log(msg: str) -> None:
    print(f"[fleet-load] {msg}", file=sys.stderr, flush=True)


def device_names(n: int) -> list[str]:
    return [f"dev-{i:05d}" for i in range(n)]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


# -- setup ------------------------------------------------------------------------------------------
def ensure_pki(devices: list[str]) -> Path:
    """The fleet CA, the broker and trainer certificates and one certificate per device (kept between
    runs: issuing 10,000 takes a while)."""
    from trainer.ops import pki

    d = WORK / "pki"
    if not (d / "ca.crt").exists():
        pki.init_ca(d)
        pki.issue(d, "broker", kind="server", hosts=("127.0.0.1", "localhost"))
        pki.issue(d, "trainer", kind="service")
    missing = [n for n in devices if not (d / "device" / f"{n}.crt").exists()]
    t = time.perf_counter()
    for k, name in enumerate(missing):
        pki.issue(d, name, kind="device", force=True)
        if k % 2000 == 1999:
            log(f"issued {k + 1}/{len(missing)} device certificates")
    if missing:
        log(f"issued {len(missing)} device certificates in {time.perf_counter() - t:.0f} s")
    return d


def _pg(autocommit: bool = True) -> Any:
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(PG_SERVER)
    return psycopg.connect(
        host=u.host, port=u.port or 5432, user=u.username, dbname=u.database, autocommit=autocommit
    )


def fresh_db() -> str:
    """The URL of an empty database for one broker's run."""
    from sqlalchemy.engine import make_url

    with _pg() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    return make_url(PG_SERVER).set(database=DB_NAME).render_as_string(hide_password=False)


def drop_db() -> None:
    with _pg() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


def write_templates(seed: Any, period: float, path: Path, count: int = 16) -> int:
    """Realistic windows of the champion's model (the agent's aggregator on random frames); the
    simulators copy them per device and seq. Returns the mean payload size in bytes."""
    from edge_agent.protocol import ModelRef
    from trainer.sim.tiny import LABELS
    from trainer.sim.windows import windows

    m = seed.champion.manifest
    ref = ModelRef(name=m.name, version=m.version, sha256=seed.champion.sha256, artifact="onnx-fp32")
    ws = windows(
        "template",
        count,
        fleet=FLEET,
        model=ref,
        frames_per_window=int(5 * period),  # 5 fps, the agent's default window of frames
        window_s=period,
        num_classes=len(LABELS),
        edges=m.telemetry_edges,
    )
    lines = [w.model_dump_json(exclude_none=True) for w in ws]
    path.write_text("\n".join(lines))
    return int(statistics.mean(len(line) for line in lines))


# -- brokers ----------------------------------------------------------------------------------------
@dataclass
class Tier:
    """A running broker tier: where devices and the trainer connect, and its processes."""

    name: str
    endpoints: list[tuple[str, int]]
    trainer_url: str
    nats_urls: list[str] | None
    pids: dict[str, int]
    version: str
    http_ports: list[int] = field(default_factory=list)
    """NATS nodes' monitoring ports (/varz, /jsz)."""


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


@contextmanager
def mosquitto_tier(pki_dir: Path) -> Iterator[Tier]:
    """A private mosquitto: mutual TLS, certificate names as users, deploy/mosquitto's ACL and its
    persistence settings (autosave every 60 s)."""
    from trainer.ops.broker import BrokerTLS, MosquittoBroker

    work = WORK / "mosquitto"
    tls = BrokerTLS(
        pki_dir / "ca.crt",
        pki_dir / "server" / "broker.crt",
        pki_dir / "server" / "broker.key",
        require_certificate=True,
        use_identity_as_username=True,
    )
    extra = (
        f"persistence true\npersistence_location {work}/\nautosave_interval 60\nmessage_size_limit 1048576"
    )
    broker = MosquittoBroker(
        work,
        tls=tls,
        acl_file=ROOT / "deploy" / "mosquitto" / "edgefleet.acl",
        persistence=False,
        allow_anonymous=False,
        extra_conf=extra,
    )
    (work / "mosquitto.db").unlink(missing_ok=True)
    with broker:
        assert broker.proc is not None
        yield Tier(
            "mosquitto",
            [("127.0.0.1", broker.port)],
            broker.url,
            None,
            {"mosquitto": broker.proc.pid},
            _version([str(broker.binary), "-h"]),
        )


@contextmanager
def nats_tier(pki_dir: Path, devices: list[str]) -> Iterator[Tier]:
    """The 3-node NATS JetStream cluster rendered from deploy/nats (mutual TLS, one user per device)."""
    import shutil

    from trainer.ops.nats_cluster import NatsCluster

    work = WORK / "nats"
    shutil.rmtree(work, ignore_errors=True)
    cluster = NatsCluster(work, pki_dir, size=3, devices=devices).start(timeout=120)
    try:
        yield Tier(
            "nats",
            [("127.0.0.1", n.address.mqtt_port) for n in cluster.nodes],
            cluster.mqtt_url(0),
            cluster.nats_urls,
            {f"nats-{n.address.name}": n.proc.pid for n in cluster.nodes if n.proc is not None},
            _version([str(cluster.binary), "--version"]),
            [n.address.http_port for n in cluster.nodes],
        )
    finally:
        cluster.stop()


def trainer_settings(tier: Tier, pki_dir: Path) -> Any:
    from edge_agent.config import MqttSettings

    return MqttSettings(
        url=tier.trainer_url,
        ca=pki_dir / "ca.crt",
        cert=pki_dir / "service" / "trainer.crt",
        key=pki_dir / "service" / "trainer.key",
    )


def announce(tier: Tier, pki_dir: Path) -> None:
    """A retained canary release hint, as the trainer keeps one (every device reads it on subscribe;
    on NATS it also makes the server create its MQTT streams, which the ingest consumer needs)."""
    from edge_agent.protocol import ReleaseHint
    from trainer.release.hints import HintSender

    hint = ReleaseHint(
        fleet=FLEET,
        channel="canary",
        model="colour",
        version="1.0.1",
        release=1,
        target=f"canary/{FLEET}/colour.tar",
        sha256="a" * 64,
        length=1,
        package_sha256="b" * 64,
        ts=time.time(),
    )
    with HintSender(trainer_settings(tier, pki_dir)) as sender:
        sender.hint(hint)


# -- the trainer side ---------------------------------------------------------------------------------
@contextmanager
def ingest_workers(tier: Tier, pki_dir: Path, db_url: str, workers: int) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m trainer.cli.ingest run``: a supervisor and one process per worker."""
    work = WORK / "ingest"
    work.mkdir(parents=True, exist_ok=True)
    for f in work.glob("*.json"):
        f.unlink()
    cmd = [sys.executable, "-m", "trainer.cli.ingest", "run", "--broker", tier.trainer_url]
    cmd += ["--db", db_url, "--fleet", FLEET, "--workers", str(workers)]
    cmd += ["--ca", str(pki_dir / "ca.crt"), "--cert", str(pki_dir / "service" / "trainer.crt")]
    cmd += ["--key", str(pki_dir / "service" / "trainer.key"), "--stats-interval", "2"]
    cmd += ["--stats-file", str(work / "worker-{index}.json")]
    for url in tier.nats_urls or []:
        cmd += ["--nats", url]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=open(work / "ingest.log", "wb"))  # noqa: SIM115
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()


def worker_stats() -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted((WORK / "ingest").glob("worker-*.json"))]


class CommitWatcher(threading.Thread):
    """Sees each window row once it is committed (polls PostgreSQL every 0.25 s): (device, seq) -> the
    time it became visible and its ``received_at``."""

    def __init__(self, db_url: str) -> None:
        super().__init__(daemon=True)
        from sqlalchemy import create_engine

        self.engine = create_engine(db_url)
        self.seen: dict[tuple[str, int], tuple[float, float]] = {}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        from sqlalchemy import text

        q = text("SELECT id, device, seq, received_at FROM windows WHERE id > :low AND device LIKE 'dev-%'")
        top = 0
        from sqlalchemy.exc import OperationalError

        while not self.stop_flag.wait(POLL_S):
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(q, {"low": top - 5000}).all()
            except OperationalError:  # the run failed and its database is gone
                return
            now = time.time()
            for row_id, device, seq, received in rows:
                self.seen.setdefault((device, seq), (now, received))
                top = max(top, row_id)

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(5)
        self.engine.dispose()


class RssSampler(threading.Thread):
    """The maximum RSS of each named process (and of its children, named ``name/index``), every 2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pids: dict[str, int] = {}
        self.max_mb: dict[str, float] = {}
        self.stop_flag = threading.Event()

    def sample(self) -> None:
        import psutil

        for name, pid in list(self.pids.items()):
            try:
                mb = psutil.Process(pid).memory_info().rss / 2**20
            except psutil.Error:
                continue
            self.max_mb[name] = round(max(self.max_mb.get(name, 0.0), mb), 1)

    def run(self) -> None:
        while not self.stop_flag.wait(2.0):
            self.sample()

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(5)
        self.sample()


class NatsProbe(threading.Thread):
    """Every 10 s, the NATS nodes' own view (/varz and /jsz): client connections, JetStream consumers,
    API errors, memory and whether a meta leader is known; the last sample per node in full."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(daemon=True)
        self.ports = ports
        self.timeline: list[dict[str, Any]] = []
        self.last: list[dict[str, Any]] = []
        self.stop_flag = threading.Event()
        self.t0 = time.time()

    def sample(self) -> None:
        import urllib.request

        nodes: list[dict[str, Any]] = []
        for port in self.ports:
            try:
                got = {}
                for page in ("varz", "jsz"):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{page}", timeout=5) as r:
                        got[page] = json.loads(r.read())
            except (OSError, ValueError) as exc:
                nodes.append({"error": str(exc)})
                continue
            v, j = got["varz"], got["jsz"]
            nodes.append(
                {
                    "connections": v.get("connections"),
                    "subscriptions": v.get("subscriptions"),
                    "mem_mb": round(v.get("mem", 0) / 2**20, 1),
                    "consumers": j.get("consumers"),
                    "api_total": j.get("api", {}).get("total"),
                    "api_errors": j.get("api", {}).get("errors"),
                    "meta_leader": j.get("meta_cluster", {}).get("leader"),
                }
            )
        self.last = nodes
        total = {k: sum(n.get(k) or 0 for n in nodes) for k in ("connections", "consumers", "api_errors")}
        self.timeline.append({"t_s": round(time.time() - self.t0), **total})

    def run(self) -> None:
        while not self.stop_flag.wait(10.0):
            self.sample()

    def stop(self) -> dict[str, Any]:
        self.stop_flag.set()
        self.join(15)
        self.sample()
        peak = {k: max((t[k] for t in self.timeline), default=0) for k in ("connections", "consumers")}
        return {"peak_totals": peak, "nodes_at_end": self.last, "timeline": self.timeline}


def add_worker_pids(sampler: RssSampler, supervisor: subprocess.Popen[bytes]) -> None:
    """The ingest worker processes under the supervisor (spawned children, excluding the resource
    tracker), once they are up."""
    import psutil

    for k, child in enumerate(
        c
        for c in psutil.Process(supervisor.pid).children()
        if "resource_tracker" not in " ".join(c.cmdline())
    ):
        sampler.pids[f"ingest-worker-{k}"] = child.pid


# -- the simulated fleet --------------------------------------------------------------------------------
@dataclass
class Sims:
    """The simulator processes of one run."""

    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    outs: list[Path] = field(default_factory=list)

    def lines(self, expect: str, timeout: float) -> list[str]:
        """The next line of each simulator, which must start with ``expect``."""
        got = []
        deadline = time.monotonic() + timeout
        for p in self.procs:
            assert p.stdout is not None
            line = ""
            while not line.startswith(expect):
                line = p.stdout.readline()  # what it printed before exiting is still read
                if (not line and p.poll() is not None) or time.monotonic() > deadline:
                    raise RuntimeError(f"simulator {p.pid} did not say {expect} (exit {p.poll()})")
            got.append(line)
        return got

    def go(self, t0: float) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(f"GO {t0}\n")
            p.stdin.flush()

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(o.read_text()) for o in self.outs]


def start_sims(
    tier: Tier, pki_dir: Path, devices: list[str], args: argparse.Namespace, templates: Path
) -> Sims:
    sims = Sims()
    session = int(time.time())
    for k in range(args.procs):
        mine = [(d, i) for i, d in enumerate(devices) if i % args.procs == k]
        spec = {
            "fleet": FLEET,
            "session": session,
            "devices": mine,
            "total_devices": len(devices),
            "endpoints": tier.endpoints,
            "tls": {"ca": str(pki_dir / "ca.crt"), "dir": str(pki_dir / "device")},
            "period": args.period,
            "seconds": args.seconds,
            "keepalive": 60,
            "max_pending": args.max_pending,
            "connect_timeout_s": args.connect_timeout,
            "flush_timeout_s": 120,
            "templates": str(templates),
            "out": str(WORK / f"sim-{k}.json"),
        }
        spec_path = WORK / f"sim-{k}.spec.json"
        spec_path.write_text(json.dumps(spec))
        sims.outs.append(Path(spec["out"]))
        sims.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.fleet_sim", str(spec_path)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=open(WORK / f"sim-{k}.log", "w"),  # noqa: SIM115
                text=True,
            )
        )
    return sims


def lag_summary(
    published: list[list[Any]], seen: dict[tuple[str, int], tuple[float, float]], t0: float, span: float
) -> dict[str, Any]:
    """Publish -> committed (and -> received by a worker), overall and per sixth of the run."""
    lags: list[float] = []
    recv: list[float] = []
    buckets: list[list[float]] = [[] for _ in range(6)]
    for device, seq, ts in published:
        got = seen.get((device, seq))
        if got is None:
            continue
        lags.append(got[0] - ts)
        recv.append(got[1] - ts)
        buckets[max(0, min(5, int(6 * (ts - t0) / span)))].append(got[0] - ts)
    return {
        "committed_s": {"p50": pct(lags, 0.5), "p95": pct(lags, 0.95), "max": pct(lags, 1.0), "n": len(lags)},
        "received_s": {"p50": pct(recv, 0.5), "p95": pct(recv, 0.95), "max": pct(recv, 1.0)},
        "committed_p95_by_sixth_s": [pct(b, 0.95) for b in buckets],
    }


def drift_step(db_url: str, sha: str, t0: float, end: float) -> dict[str, Any]:
    """The service's drift step over every slot of the run, then its health step (FleetService's
    ``_drift_step`` and ``_health_step``: DriftService.poll, DriftService.health, put_device_health)."""
    from trainer.drift.detector import DriftConfig
    from trainer.fleet.drift_service import DriftService
    from trainer.fleet.service import HEALTH_RATE_WINDOW_S
    from trainer.store import Store
    from trainer.store.console_queries import put_device_health

    store = Store(db_url)
    drift = DriftService(store, FLEET, DriftConfig(), slot_s=60.0, grace_s=15.0, start=t0)
    slot_s: list[float] = []  # as the service does: each slot once it has closed (grace included)
    events = []
    while (drift.next_slot or 0.0) <= end:
        t = time.perf_counter()
        events += drift.poll((drift.next_slot or 0.0) + 60.0 + 15.0)
        slot_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    activity = store.recent_activity(FLEET, end - HEALTH_RATE_WINDOW_S)
    _health, rows = drift.health_rows(sha, activity)
    put_device_health(store, FLEET, rows, time.time())
    health_s = time.perf_counter() - t
    store.close()
    return {
        "drift_poll_s": round(sum(slot_s), 2),
        "slots": len(slot_s),
        "drift_s_by_slot": [round(x, 2) for x in slot_s],
        "assessed": drift.assessed,
        "transitions": len(events),
        "health_step_s": round(health_s, 2),
        "health_rows": len(rows),
    }


def _serve_console(db_url: str, port: int, model: str, repo: str) -> None:
    """In the console's own process: the app on a real uvicorn, as ``edgefleet console`` serves it."""
    import uvicorn

    from trainer.console.app import create_app
    from trainer.console.deps import ConsoleContext
    from trainer.store import Store

    ctx = ConsoleContext(store=Store(db_url), fleet=FLEET, model=model, repo_path=Path(repo))
    uvicorn.run(create_app(ctx), host="127.0.0.1", port=port, log_level="warning")


CONSOLE_READS = {
    "fleet_page_first": "/fleet",
    "fleet_page_filtered_sorted": "/fleet?state=online&drift=ok&sort=last_seen&order=desc&page=3",
    "api_devices_first": "/api/v1/devices?limit=50",
    "api_devices_filtered_sorted": "/api/v1/devices?state=online&drift=ok&sort=last_seen&order=desc&limit=50&offset=100",
    "fleet_page_search": "/fleet?search=dev-0123",
}


def console_times(db_url: str, seed: Any, requests: int) -> dict[str, Any]:
    """Server time (Server-Timing) and wall time of the fleet reads, logged in as the seeded viewer."""
    import http.cookiejar
    import multiprocessing as mp
    import urllib.parse
    import urllib.request

    import psutil

    from trainer.ops.broker import free_port

    port = free_port()
    proc = mp.get_context("spawn").Process(
        target=_serve_console, args=(db_url, port, seed.champion.manifest.name, str(seed.repo_path))
    )
    proc.start()
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        _wait_http(opener, base + "/login", 60)
        user, password = seed.users["viewer"]
        form = urllib.parse.urlencode({"username": user, "password": password, "next": "/fleet"}).encode()
        opener.open(base + "/login", data=form, timeout=30).read()
        out: dict[str, Any] = {}
        for name, path in CONSOLE_READS.items():
            server, wall = [], []
            for _ in range(requests):
                t = time.perf_counter()
                with opener.open(base + path, timeout=60) as r:
                    r.read()
                    timing = r.headers.get("Server-Timing", "")
                wall.append(1000 * (time.perf_counter() - t))
                server.append(float(timing.split("dur=")[1]) if "dur=" in timing else float("nan"))
            out[name] = {
                "server_p50_ms": pct(server, 0.5),
                "server_p95_ms": pct(server, 0.95),
                "wall_p50_ms": pct(wall, 0.5),
            }
        out["rss_mb"] = round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
        return out
    finally:
        proc.terminate()
        proc.join(20)


def _wait_http(opener: Any, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            opener.open(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# -- one broker's run ---------------------------------------------------------------------------------------
def stored_keys(db_url: str) -> set[tuple[str, int]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT device, seq FROM windows WHERE device LIKE 'dev-%'")).all()
    engine.dispose()
    return {(d, s) for d, s in rows}


def _wait_stored(watcher: CommitWatcher, sent: int, timeout: float) -> float:
    """Seconds after the fleet stopped until every window was committed (or the timeout)."""
    t = time.monotonic()
    while len(watcher.seen) < sent and time.monotonic() - t < timeout:
        time.sleep(POLL_S)
    return time.monotonic() - t


def _fleet_phase(
    tier: Tier,
    pki_dir: Path,
    devices: list[str],
    args: argparse.Namespace,
    templates: Path,
    sampler: RssSampler,
) -> dict[str, Any]:
    """Connect the fleet, publish for ``--seconds``, flush: the simulators' merged results."""
    t = time.time()
    sims = start_sims(tier, pki_dir, devices, args, templates)
    for k, p in enumerate(sims.procs):
        sampler.pids[f"simulator-{k}"] = p.pid
    sims.lines("READY", args.connect_timeout + 120)
    connected_at = time.time()
    log(f"{tier.name}: fleet connected in {connected_at - t:.1f} s (incl. simulator start-up)")
    t0 = time.time() + 5.0
    sims.go(t0)
    sims.lines("DONE", args.seconds + 900)
    res = sims.results()
    starts = [r["connect_started"] for r in res]
    dones = [r["connect_done"] for r in res if r["connect_done"]]
    per_device = [x for r in res for x in r["device_connect_s"]]
    start = min(starts)
    at = sorted(x - start for r in res for x in r.get("confirmed_at", []))
    by_s = {str(s): sum(1 for x in at if x <= s) for s in (10, 30, 60, 120, 300)}
    return {
        "t0": t0,
        "connected": sum(r["connected"] for r in res),
        "connected_by_s": by_s,
        "finally_connected": sum(r.get("finally_connected", r["connected"]) for r in res),
        "connect_fleet_s": round(max(dones) - min(starts), 2) if dones else None,
        "connect_device_s": {
            "p50": pct(per_device, 0.5),
            "p95": pct(per_device, 0.95),
            "max": pct(per_device, 1.0),
        },
        "published": [x for r in res for x in r["published"]],
        "scheduled": sum(r["scheduled"] for r in res),
        "unacked": sum(r["unacked"] for r in res),
        "unacked_keys": [tuple(k) for r in res for k in r.get("unacked_keys", [])],
        "puback_ms": {
            "p50": pct([x for r in res for x in r["puback_ms"]], 0.5),
            "p95": pct([x for r in res for x in r["puback_ms"]], 0.95),
        },
        "max_publish_lateness_s": round(max(r["max_lateness_s"] for r in res), 2),
        "render_s": round(max(r["render_s"] for r in res), 2),
        "simulator_cpu_s": [round(r["cpu_s"], 1) for r in res],
        "connect_failures": sum(r["connect_failures"] for r in res),
        "disconnects": sum(r["disconnects"] for r in res),
        "refused_subscriptions": sum(r["refused_subscriptions"] for r in res),
    }


def run_broker(name: str, args: argparse.Namespace, pki_dir: Path, devices: list[str]) -> dict[str, Any]:
    """One broker: fresh database, broker, ingest, fleet, drift and health steps, console; the figures."""
    import shutil

    from trainer.sim.console_seed import seed_console
    from trainer.store import Store

    shutil.rmtree(WORK / "seed", ignore_errors=True)
    db_url = fresh_db()
    store = Store(db_url)
    seed = seed_console(store, WORK / "seed", devices=4, hours=1.0, now=time.time())
    store.close()
    templates = WORK / "templates.jsonl"
    window_bytes = write_templates(seed, args.period, templates)
    tier_cm = mosquitto_tier(pki_dir) if name == "mosquitto" else nats_tier(pki_dir, devices)
    sampler = RssSampler()
    try:
        with tier_cm as tier:
            sampler.pids.update(tier.pids)
            sampler.start()
            probe = NatsProbe(tier.http_ports)
            if tier.http_ports:
                probe.start()
            announce(tier, pki_dir)
            watcher = CommitWatcher(db_url)
            watcher.start()
            with ingest_workers(tier, pki_dir, db_url, args.workers) as supervisor:
                time.sleep(3.0)
                add_worker_pids(sampler, supervisor)
                fleet = _fleet_phase(tier, pki_dir, devices, args, templates, sampler)
                sent = len({(d, s) for d, s, _ in fleet["published"]})
                drain_s = _wait_stored(watcher, sent, 180)
            watcher.stop()
            sampler.stop()
            nats_view = probe.stop() if tier.http_ports else None
            stats = worker_stats()
        stored = stored_keys(db_url)
        published = fleet.pop("published")
        unacked_keys = set(fleet.pop("unacked_keys"))
        span = args.seconds
        result = {
            "broker_version": tier.version,
            "window_bytes": window_bytes,
            **fleet,
            "sent": sent,
            "stored": len(stored),
            "missing": len({(d, s) for d, s, _ in published} - stored),
            # what a device saw acknowledged and the store does not hold: lost (the rest it would resend)
            "missing_acknowledged": len({(d, s) for d, s, _ in published} - stored - unacked_keys),
            "drain_after_stop_s": round(drain_s, 1),
            "ingest_duplicates": sum(s.get("duplicates", 0) for s in stats),
            "ingest_workers": [
                {k: s.get(k) for k in ("received", "stored", "duplicates", "dead_lettered", "process_cpu_s")}
                for s in stats
            ],
            "lag": lag_summary(published, watcher.seen, fleet["t0"], span),
            "rss_mb": dict(sampler.max_mb),
        }
        if nats_view is not None:
            result["nats_view"] = nats_view
        log(f"{name}: drift and health steps")
        result["drift"] = drift_step(db_url, seed.champion.sha256, fleet["t0"], fleet["t0"] + span)
        log(f"{name}: console")
        result["console"] = console_times(db_url, seed, args.requests)
        return result
    finally:
        sampler.stop_flag.set()
        drop_db()


# -- report ---------------------------------------------------------------------------------------------------
def table(doc: dict[str, Any]) -> str:
    rows: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("devices connected", lambda r: f"{r['connected']}/{doc['config']['devices']}"),
        ("fleet connect s", lambda r: r["connect_fleet_s"]),
        ("device connect p95 s", lambda r: r["connect_device_s"]["p95"]),
        ("windows sent / stored", lambda r: f"{r['sent']} / {r['stored']}"),
        (
            "missing (acked) / dups",
            lambda r: f"{r['missing']} ({r['missing_acknowledged']}) / {r['ingest_duplicates']}",
        ),
        ("lag p50 / p95 / max s", lambda r: "{p50} / {p95} / {max}".format(**r["lag"]["committed_s"])),
        ("lag p95 by sixth s", lambda r: " ".join(str(x) for x in r["lag"]["committed_p95_by_sixth_s"])),
        ("PUBACK p50 / p95 ms", lambda r: "{p50} / {p95}".format(**r["puback_ms"])),
        ("drift step s per slot", lambda r: " ".join(str(x) for x in r["drift"]["drift_s_by_slot"])),
        ("health step s", lambda r: r["drift"]["health_step_s"]),
        (
            "fleet page p50/p95 ms",
            lambda r: "{server_p50_ms} / {server_p95_ms}".format(**r["console"]["fleet_page_first"]),
        ),
        (
            "filtered page p50/p95",
            lambda r: "{server_p50_ms} / {server_p95_ms}".format(
                **r["console"]["fleet_page_filtered_sorted"]
            ),
        ),
        (
            "api first p50/p95 ms",
            lambda r: "{server_p50_ms} / {server_p95_ms}".format(**r["console"]["api_devices_first"]),
        ),
        ("console RSS MB", lambda r: r["console"]["rss_mb"]),
    ]
    brokers = list(doc["results"])
    lines = [f"{'':26}" + "".join(f"{b:>26}" for b in brokers)]
    for label, get in rows:
        cells = []
        for b in brokers:
            r = doc["results"][b]
            try:
                cells.append(str(get(r)) if "error" not in r else r["error"][:24])
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"{label:26}" + "".join(f"{c:>26}" for c in cells))
    for b in brokers:
        for proc, mb in sorted(doc["results"][b].get("rss_mb", {}).items()):
            lines.append(f"  {b} RSS {proc:20} {mb:8.1f} MB")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet_load_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--period", type=float, default=60.0, help="seconds between a device's windows")
    ap.add_argument("--seconds", type=float, help="publishing time (default 3 periods: 3 windows per device)")
    ap.add_argument("--brokers", default="mosquitto,nats")
    ap.add_argument("--procs", type=int, default=4, help="simulator processes")
    ap.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    ap.add_argument("--max-pending", type=int, default=200, help="connections awaiting CONNACK per simulator")
    ap.add_argument("--connect-timeout", type=float, default=300.0)
    ap.add_argument("--requests", type=int, default=20, help="requests per console read")
    ap.add_argument("--quick", action="store_true", help="500 devices, 10 s period, 30 s (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet_load.json")
    ap.add_argument("--work", type=Path, default=WORK, help="scratch directory (the PKI is cached here)")
    ap.add_argument("--db-name", default=DB_NAME, help="the database created and dropped on the server")
    ap.add_argument("--pg", default=PG_SERVER, help="PostgreSQL server URL (EDGEFLEET_BENCH_PG)")
    args = ap.parse_args(argv)
    if args.quick:
        args.devices, args.period, args.procs, args.requests = min(args.devices, 500), 10.0, 2, 5
        args.seconds = args.seconds or 30.0
    args.seconds = args.seconds or 3 * args.period
    return args


def main(argv: list[str] | None = None) -> int:
    global WORK, DB_NAME, PG_SERVER  # noqa: PLW0603 - one run's places, set once before anything runs
    args = parse(argv)
    WORK, DB_NAME, PG_SERVER = args.work, args.db_name, args.pg
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the brokers inherit it
    WORK.mkdir(parents=True, exist_ok=True)
    devices = device_names(args.devices)
    pki_dir = ensure_pki(devices)
    results: dict[str, Any] = {}
    for name in [b.strip() for b in args.brokers.split(",") if b.strip()]:
        log(f"{name}: {args.devices} devices, one window each per {args.period:g} s for {args.seconds:g} s")
        try:
            results[name] = run_broker(name, args, pki_dir, devices)
        except Exception as exc:  # noqa: BLE001 - report the broker that failed, run the other
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    doc = {
        "bench": "fleet_load",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tls": "mutual TLS on both brokers, one certificate per device (trainer.ops.pki)",
        "database": "PostgreSQL (fresh database per broker)",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "cpu_flags": cpu_flags(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(table(doc))
    ok = all("error" not in r and r["stored"] == r["sent"] for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
