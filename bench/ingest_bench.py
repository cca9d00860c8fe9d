"""Ingest throughput against raw MQTT, and one worker against two, measured in the same run.

Everything runs on a private mosquitto (QoS 1, in-memory persistence off) with separate processes for
the publisher, the raw subscriber and each ingest worker, as in production::

    python -m bench.ingest_bench [--messages 20000] [--repeat 2] [--quick]

Two modes, both reported:

* live: a paho publisher sends N messages as fast as it can while the consumer runs; throughput is
  N / (last message consumed - first publish). The raw baseline is a paho subscriber (QoS 1, automatic
  PUBACK) -> ``raw``; ingest is validation + store commit + manual PUBACK -> ``ingest``. This is the
  issue's "ingest >= 0.8x raw paho -> mosquitto -> paho" comparison.
* drain: the N messages are queued in the consumers' persistent sessions while they are offline, then
  the consumers start; throughput is N / (last consumed - first received). This measures consumer
  capacity alone (no publisher competing for the 2 cores), which is what "2 workers >= 1.6x one" asks.

Payloads: ``tiny`` (the smallest valid window, ~450 B, the issue's "300-byte" class), ``window``
(realistic ~3.5 KB windows from the agent's aggregator), and for raw only ``opaque300`` (300 random
bytes, the issue's reference of ~9,000 msg/s). Stores: SQLite file (WAL) and PostgreSQL (a fresh
database on ``--pg``). Each configuration runs ``--repeat`` times; the best run counts (the machine is
shared, so the slowest runs measure other people's jobs). Results: bench/results/ingest.json.

The same run then explains the gap to the target (``--breakdown-messages``, 0 to skip): the CPU of each
stage of one worker's writer per 3.5 KB window, with the worker's GC settings and CPython's defaults
(``breakdown_us_per_msg``, bench/ingest_breakdown.py), the windows insert by each method
(``insert_methods``), pydantic against msgspec on the same windows (``decode_microbench``,
bench/decode_bench.py) and ``gap_to_target``: paho's receive cost (the raw subscriber) + the writer's
stages against the CPU per message a worker could spend at 0.8x the raw drain rate.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FLEET = "bench"
DEVICES = 1000
"""Messages are spread over this many devices, so a batch touches many device rows, as in a real fleet
(devices report every 10-60 s, so at thousands of windows/s nearly every window is from another device)."""
TARGET_RAW_RATIO = 0.8
TARGET_SCALING = 1.6


# -- payloads ------------------------------------------------------------------------------------
def make_payloads(kind: str, n: int) -> list[tuple[str, bytes]]:
    """``n`` (topic, payload) pairs spread over DEVICES devices."""
    from edge_agent.protocol import tele_topic
    from trainer.sim.windows import tiny_window, windows

    per = -(-n // DEVICES)
    out: list[tuple[str, bytes]] = []
    if kind == "opaque300":
        return [(tele_topic(FLEET, f"cam{i % DEVICES}"), os.urandom(300)) for i in range(n)]
    if kind == "tiny":
        for seq in range(per):
            out += [
                (tele_topic(FLEET, f"cam{d}"), tiny_window(f"cam{d}", seq, fleet=FLEET).to_bytes())
                for d in range(DEVICES)
            ]
        return out[:n]
    if kind == "window":
        template = windows("cam0", min(per, 50), fleet=FLEET)
        for seq in range(per):
            for d in range(DEVICES):
                w = template[seq % len(template)].model_copy(update={"device": f"cam{d}", "seq": seq})
                out.append((tele_topic(FLEET, f"cam{d}"), w.to_bytes()))
        return out[:n]
    raise ValueError(kind)


# -- child processes -----------------------------------------------------------------------------
def _client(port: int, client_id: str = "", clean: bool = True, inflight: int | None = None) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean if client_id else True,
        protocol=mqtt.MQTTv311,
    )
    if inflight:
        c.max_inflight_messages_set(inflight)
    c.connect("127.0.0.1", port, keepalive=60)
    return c


def _publisher(port: int, payload_file: str, out: Any) -> None:
    """Publish every message at QoS 1 as fast as paho allows; report start and end times."""
    import pickle

    with open(payload_file, "rb") as f:
        msgs = pickle.load(f)
    c = _client(port, inflight=1000)
    c.loop_start()
    t0, cpu0 = time.time(), time.process_time()
    infos = [c.publish(t, p, qos=1) for t, p in msgs]
    for i in infos:
        i.wait_for_publish(300)
    t1, cpu1 = time.time(), time.process_time()
    c.disconnect()
    c.loop_stop()
    out.put({"publish_start": t0, "publish_end": t1, "cpu_s": cpu1 - cpu0})


def _raw_subscriber(
    port: int, topic: str, n: int, client_id: str, ready: Any, out: Any, subscribe_only: bool
) -> None:
    """Receive ``n`` messages (QoS 1, automatic PUBACK); report first and last receive times."""
    import threading

    c = _client(port, client_id, clean=False)
    state: dict[str, Any] = {"n": 0, "first": None, "last": None, "cpu_first": None, "cpu_last": None}
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        now = time.time()
        if state["first"] is None:
            state["first"], state["cpu_first"] = now, time.process_time()
        state["n"] += 1
        state["last"] = now
        if state["n"] >= n:
            state["cpu_last"] = time.process_time()
            done.set()

    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    c.subscribe(topic, qos=1)
    c.loop_start()
    subscribed.wait(10)
    ready.set()
    if not subscribe_only:
        done.wait(600)
    c.disconnect()
    c.loop_stop()
    out.put(
        {
            "received": state["n"],
            "first_received": state["first"],
            "last_received": state["last"],
            "cpu_s": (state["cpu_last"] or 0.0) - (state["cpu_first"] or 0.0),
        }
    )


def _ingest_child(config: Any, stats_file: str, ready: Any, go: Any) -> None:
    """One worker process: import everything, say so, wait for the common start, then run."""
    import logging

    import trainer.ingest.worker  # noqa: F401 - the imports are the slow part of starting
    from trainer.ingest.processes import run_worker

    logging.basicConfig(level=logging.WARNING)
    ready.set()
    go.wait(120)
    run_worker(config, stats_file, stats_interval=1.0)


# -- measurements --------------------------------------------------------------------------------
class Bench:
    """One broker, one temp dir, helpers to run the consumers and the publisher."""

    def __init__(self, work: Path, pg_server: str | None) -> None:
        from trainer.ops.broker import MosquittoBroker

        self.work = work
        self.ctx = mp.get_context("spawn")
        self.broker = MosquittoBroker(work / "broker", persistence=False).start()
        self.pg_server = pg_server
        self._payload_files: dict[tuple[str, int], str] = {}

    def close(self) -> None:
        self.broker.stop()

    def payload_file(self, kind: str, n: int) -> str:
        import pickle

        key = (kind, n)
        if key not in self._payload_files:
            path = self.work / f"payload-{kind}-{n}.pkl"
            with open(path, "wb") as f:
                pickle.dump(make_payloads(kind, n), f)
            self._payload_files[key] = str(path)
        return self._payload_files[key]

    def publish(self, kind: str, n: int) -> dict[str, float]:
        q = self.ctx.Queue()
        p = self.ctx.Process(target=_publisher, args=(self.broker.port, self.payload_file(kind, n), q))
        p.start()
        res = _result(p, q)
        p.join(30)
        return res

    # raw -----------------------------------------------------------------------------------------
    def raw(self, kind: str, n: int, mode: str) -> dict[str, Any]:
        topic = f"ef/v1/{FLEET}/dev/+/tele"
        cid = f"raw-{uuid.uuid4().hex[:8]}"

        def sub(subscribe_only: bool) -> tuple[Any, Any, Any]:
            ready, q = self.ctx.Event(), self.ctx.Queue()
            p = self.ctx.Process(
                target=_raw_subscriber, args=(self.broker.port, topic, n, cid, ready, q, subscribe_only)
            )
            p.start()
            ready.wait(30)
            return p, q, ready

        pub: dict[str, Any] = {}
        if mode == "live":
            p, q, _ = sub(False)
            watch = CpuWatch(self.broker)
            pub = self.publish(kind, n)
            res = _result(p, q)
            cpu = watch.stop()
            p.join(30)
            elapsed = res["last_received"] - pub["publish_start"]
        else:
            p, q, _ = sub(True)  # create the persistent session, go offline
            _result(p, q, 60)
            p.join(30)
            self.publish(kind, n)
            watch = CpuWatch(self.broker)
            p, q, _ = sub(False)
            res = _result(p, q)
            cpu = watch.stop()
            p.join(30)
            elapsed = res["last_received"] - res["first_received"]
        assert res["received"] == n, res
        cpu.update(
            consumer_us_per_msg=res["cpu_s"] / n * 1e6,
            publisher_us_per_msg=pub["cpu_s"] / n * 1e6 if pub else None,
        )
        return {
            "consumer": "raw",
            "payload": kind,
            "mode": mode,
            "messages": n,
            "seconds": elapsed,
            "msg_per_s": n / elapsed,
            "cpu": _per_msg(cpu, n),
        }

    # ingest --------------------------------------------------------------------------------------
    def db_url(self, db: str) -> tuple[str, Callable[[], None]]:
        if db == "sqlite":
            path = self.work / f"ingest-{uuid.uuid4().hex[:8]}.db"

            def remove() -> None:
                for suffix in ("", "-wal", "-shm", ".writelock"):
                    Path(str(path) + suffix).unlink(missing_ok=True)

            return f"sqlite:///{path}", remove
        import psycopg
        from sqlalchemy.engine import make_url

        assert self.pg_server
        u = make_url(self.pg_server)
        name = f"ef_bench_{uuid.uuid4().hex[:8]}"
        kw: dict[str, Any] = {
            "host": u.host,
            "port": u.port or 5432,
            "user": u.username,
            "dbname": u.database,
            "autocommit": True,
        }
        with psycopg.connect(**kw) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

        def drop() -> None:
            with psycopg.connect(**kw) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        return u.set(database=name, drivername="postgresql+psycopg").render_as_string(
            hide_password=False
        ), drop

    def _workers(
        self, url: str, group: str, count: int, tag: str, on_ready: Callable[[], None] | None = None
    ) -> tuple[list[Any], list[Path]]:
        from edge_agent.config import MqttSettings
        from trainer.ingest.worker import IngestConfig

        procs, files, readies = [], [], []
        go = self.ctx.Event()
        for i in range(count):
            cfg = IngestConfig(
                mqtt=MqttSettings(url=self.broker.url),
                db_url=url,
                fleet=FLEET,
                group=group,
                index=i,
                kinds=("tele",),
            )
            f = self.work / f"stats-{tag}-{i}.json"
            f.unlink(missing_ok=True)
            ready = self.ctx.Event()
            p = self.ctx.Process(target=_ingest_child, args=(cfg, str(f), ready, go))
            p.start()
            procs.append(p)
            files.append(f)
            readies.append(ready)
        for r in readies:  # all imported: they connect together (a backlog is drained from the same start)
            r.wait(60)
        if on_ready is not None:
            on_ready()
        go.set()
        deadline = time.time() + 60
        while time.time() < deadline and not all(_read(f).get("connects", 0) >= 1 for f in files):
            time.sleep(0.05)
        time.sleep(0.3)  # subscriptions acknowledged
        return procs, files

    def _stop(self, procs: list[Any]) -> None:
        for p in procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(60)

    def ingest(self, kind: str, n: int, mode: str, db: str, workers: int) -> dict[str, Any]:
        from trainer.store import Store

        url, drop = self.db_url(db)
        group = f"g{uuid.uuid4().hex[:8]}"
        tag = uuid.uuid4().hex[:6]
        try:
            with Store(url) as store:  # devices run a registered model, as in production
                from trainer.sim.windows import model_ref

                store.register_model(_bench_manifest(), model_ref().sha256, actor="bench")
            pub: dict[str, Any] = {}
            if mode == "live":
                procs, files = self._workers(url, group, workers, tag)
                watch = CpuWatch(self.broker)
                pub = self.publish(kind, n)
                stats = _wait_stored(files, n)
                start = pub["publish_start"]
            else:
                procs, files = self._workers(url, group, workers, tag)  # subscribe, then go offline
                self._stop(procs)
                self.publish(kind, n)
                watches: list[CpuWatch] = []
                procs, files = self._workers(
                    url, group, workers, tag, lambda: watches.append(CpuWatch(self.broker))
                )
                watch = watches[0]
                stats = _wait_stored(files, n)
                start = min(s["first_received_at"] for s in stats if s.get("first_received_at"))
            cpu = watch.stop()
            worker_cpu = sum(s["process_cpu_s"] - s["process_cpu_s_at_first_message"] for s in stats)
            cpu.update(
                consumer_us_per_msg=worker_cpu / n * 1e6,
                publisher_us_per_msg=pub["cpu_s"] / n * 1e6 if pub else None,
            )
            end = max(s["last_committed_at"] for s in stats if s.get("last_committed_at"))
            self._stop(procs)
            with Store(url, create=False) as store:
                stored = store.count_windows()
        finally:
            drop()
        assert stored == n, (stored, n)
        batches = sum(s["batches"] for s in stats)
        return {
            "consumer": f"ingest-{db}-{workers}w",
            "payload": kind,
            "mode": mode,
            "messages": n,
            "seconds": end - start,
            "msg_per_s": n / (end - start),
            "mean_batch": n / max(batches, 1),
            "per_worker_received": [s["received"] for s in stats],
            "db_errors": sum(s["db_errors"] for s in stats),
            "cpu": _per_msg(cpu, n),
        }

    # breakdown --------------------------------------------------------------------------------
    def _child(self, target: Callable[..., None], db: str, kind: str, n: int, *args: Any) -> dict[str, Any]:
        url, drop = self.db_url(db)
        try:
            q = self.ctx.Queue()
            p = self.ctx.Process(target=target, args=(url, self.payload_file(kind, n), *args, q))
            p.start()
            res = _result(p, q)
            p.join(60)
            return res
        finally:
            drop()

    def breakdown(self, db: str, kind: str, n: int, batch: int) -> dict[str, Any]:
        """Per-stage CPU of one worker's writer on ``n`` messages, with a worker's GC settings and with
        CPython's defaults (bench/ingest_breakdown.py), each in a fresh process on a fresh database."""
        from bench.ingest_breakdown import breakdown_child

        out = {}
        for label, tuned in (("gc_tuned", True), ("gc_default", False)):
            watch = CpuWatch(self.broker)
            out[label] = self._child(breakdown_child, db, kind, n, batch, tuned)
            out[label]["machine_busy_cores"] = round(watch.stop()["machine_busy_cores"], 2)
        return out

    def insert_methods(self, db: str, kind: str, n: int, batch: int) -> dict[str, Any]:
        """The windows insert: bulk_insert (COPY on PostgreSQL) against insertmanyvalues and executemany."""
        from bench.ingest_breakdown import insert_methods_child

        watch = CpuWatch(self.broker)
        res = self._child(insert_methods_child, db, kind, n, batch)
        res["machine_busy_cores"] = round(watch.stop()["machine_busy_cores"], 2)
        return res


class CpuWatch:
    """CPU used during a run: the whole machine (from /proc/stat), mosquitto, and every postgres process.

    The machine is shared (2 cores), so ``machine_busy_cores`` shows how much of it was in use at all,
    and the per-process numbers show where a message's CPU goes. Linux only; zeros elsewhere.
    """

    def __init__(self, broker: Any) -> None:
        self.pid = broker.proc.pid if broker.proc else None
        self.t0 = time.time()
        self.start = self._snap()

    def _snap(self) -> dict[str, float]:
        return {
            "machine": _machine_busy_s(),
            "mosquitto": _proc_cpu_s(self.pid),
            "postgres": _postgres_cpu_s(),
        }

    def stop(self) -> dict[str, Any]:
        end, elapsed = self._snap(), time.time() - self.t0
        d = {k: end[k] - self.start[k] for k in end}
        return {
            "elapsed_s": elapsed,
            "machine_busy_cores": d["machine"] / elapsed,
            "mosquitto_s": d["mosquitto"],
            "postgres_s": d["postgres"],
        }


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int | None) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _postgres_cpu_s() -> float:
    total = 0.0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() in ("postgres", "postmaster"):
                    total += _proc_cpu_s(int(d.name))
            except OSError:
                continue
    return total


def _machine_busy_s() -> float:
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICK


def _per_msg(cpu: dict[str, Any], n: int) -> dict[str, Any]:
    """CPU microseconds per message of each component, and the machine's average busy cores."""
    out = {
        "machine_busy_cores": round(cpu["machine_busy_cores"], 2),
        "mosquitto_us_per_msg": round(cpu["mosquitto_s"] / n * 1e6, 1),
        "postgres_us_per_msg": round(cpu["postgres_s"] / n * 1e6, 1),
    }
    ours = cpu["mosquitto_s"] + cpu["postgres_s"]
    for k in ("consumer_us_per_msg", "publisher_us_per_msg"):
        if cpu.get(k) is not None:
            out[k] = round(cpu[k], 1)
            ours += cpu[k] * n / 1e6
    # CPU of everything else on the machine (other people's jobs) during the run, in cores
    out["other_cores"] = round(max(0.0, cpu["machine_busy_cores"] - ours / cpu["elapsed_s"]), 2)
    return out


def _result(proc: Any, q: Any, timeout: float = 600) -> dict[str, Any]:
    """The child's result, or an error as soon as it dies without one."""
    import queue

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return q.get(timeout=0.5)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{proc.name} exited with {proc.exitcode} without a result") from None
    proc.kill()
    raise TimeoutError(f"{proc.name} gave no result in {timeout} s")


def _bench_manifest() -> Any:
    from edge_agent.package import Artifact, FileEntry, ModelManifest, PreprocessSpec, TensorSpec
    from edge_agent.telemetry.histogram import default_edges
    from trainer.sim.windows import NUM_CLASSES, model_ref

    ref = model_ref()
    return ModelManifest(
        name=ref.name,
        version=ref.version,
        created="2025-01-01T00:00:00Z",
        labels=[f"c{i}" for i in range(NUM_CLASSES)],
        preprocess=PreprocessSpec(),
        artifacts={
            "tflite-int8": Artifact(
                file="m.tflite",
                runtime="litert",
                precision="int8",
                input=TensorSpec(),
                output=TensorSpec(layout="NC"),
            )
        },
        files={"m.tflite": FileEntry(sha256="0" * 64, size=1)},
        telemetry_edges=default_edges(NUM_CLASSES),
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_stored(files: list[Path], n: int, timeout: float = 600) -> list[dict[str, Any]]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = [_read(f) for f in files]
        if sum(s.get("stored", 0) + s.get("duplicates", 0) for s in stats) >= n:
            return stats
        time.sleep(0.1)
    raise TimeoutError(f"ingest did not store {n} messages in {timeout} s: {[_read(f) for f in files]}")


# -- report --------------------------------------------------------------------------------------
QUIET_OTHER_CORES = 0.25
"""A run counts as clean when other jobs used at most this many cores during it (the machine is shared)."""


def _best(rows: list[dict[str, Any]], clean: bool = False, **match: Any) -> dict[str, Any] | None:
    got = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if clean:
        got = [r for r in got if r.get("cpu", {}).get("other_cores", 0.0) <= QUIET_OTHER_CORES]
    return max(got, key=lambda r: r["msg_per_s"]) if got else None


def _clean(row: dict[str, Any]) -> bool:
    return row.get("cpu", {}).get("other_cores", 0.0) <= QUIET_OTHER_CORES


def _ratio(
    rows: list[dict[str, Any]], num: dict[str, Any], den: dict[str, Any], target: float
) -> dict[str, Any]:
    """num/den paired within each repeat (the two runs ran minutes apart at most); the median over the
    repeats where neither run shared the machine with other jobs, else over all repeats, flagged."""
    pairs = []
    for r in sorted({row["repeat"] for row in rows}):
        a = next((x for x in rows if x["repeat"] == r and all(x[k] == v for k, v in num.items())), None)
        b = next((x for x in rows if x["repeat"] == r and all(x[k] == v for k, v in den.items())), None)
        if a and b:
            pairs.append(
                (
                    a["msg_per_s"] / b["msg_per_s"],
                    _clean(a) and _clean(b),
                    round(a["msg_per_s"]),
                    round(b["msg_per_s"]),
                )
            )
    clean = [p for p in pairs if p[1]]
    use = clean or pairs
    ratio = statistics.median(p[0] for p in use)
    return {
        "ratio": ratio,
        "target": target,
        "met": ratio >= target,
        "clean": bool(clean),
        "pairs": [{"ratio": round(p[0], 3), "clean": p[1], "msg_per_s": [p[2], p[3]]} for p in pairs],
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Best run per configuration, and the ratios against the targets from runs the rest of the machine
    left alone (``clean``; other jobs <= QUIET_OTHER_CORES cores), else from the best runs, flagged."""
    configs: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        configs.setdefault((r["consumer"], r["payload"], r["mode"]), []).append(r["msg_per_s"])
    best = {}
    for (c, p, m), v in configs.items():
        top = _best(rows, consumer=c, payload=p, mode=m)
        best[f"{c}|{p}|{m}"] = {
            "best": max(v),
            "median": statistics.median(v),
            "runs": [round(x) for x in v],
            "cpu_of_best": top.get("cpu") if top else None,
        }
    ratios: dict[str, Any] = {}
    for c, p, m in configs:
        if not c.startswith("ingest"):
            continue
        if ("raw", p, m) in configs:
            ratios[f"{c} / raw | {p} | {m}"] = _ratio(
                rows,
                {"consumer": c, "payload": p, "mode": m},
                {"consumer": "raw", "payload": p, "mode": m},
                TARGET_RAW_RATIO,
            )
        one = c[:-3] + "-1w"
        if c.endswith("-2w") and (one, p, m) in configs:
            ratios[f"{c} / {one} | {p} | {m}"] = _ratio(
                rows,
                {"consumer": c, "payload": p, "mode": m},
                {"consumer": one, "payload": p, "mode": m},
                TARGET_SCALING,
            )
    return {"configs": best, "ratios": ratios, "quiet_other_cores": QUIET_OTHER_CORES}


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        "CPU columns (best run): microseconds of CPU per message of the consumer processes, mosquitto and",
        "PostgreSQL; the machine's average busy cores during the run, and how many of them were other jobs.",
        f"{'consumer':22s} {'payload':9s} {'mode':5s} {'best msg/s':>10s} {'median':>8s} {'cons us':>8s} "
        f"{'mosq us':>8s} {'pg us':>6s} {'busy':>5s} {'other':>5s}  runs",
    ]
    for key, v in sorted(summary["configs"].items()):
        c, p, m = key.split("|")
        cpu = v.get("cpu_of_best") or {}
        lines.append(
            f"{c:22s} {p:9s} {m:5s} {v['best']:10.0f} {v['median']:8.0f} {cpu.get('consumer_us_per_msg', 0):8.0f} "
            f"{cpu.get('mosquitto_us_per_msg', 0):8.0f} {cpu.get('postgres_us_per_msg', 0):6.0f} "
            f"{cpu.get('machine_busy_cores', 0):5.2f} {cpu.get('other_cores', 0):5.2f}  {v['runs']}"
        )
    lines.append("")
    lines.append(
        "ratios: median over repeats of the two runs of the same repeat, counting only repeats where"
    )
    lines.append(
        f"other jobs used <= {QUIET_OTHER_CORES} cores in both runs (* = no such repeat: all repeats, contaminated)"
    )
    lines.append(f"{'ratio':62s} {'value':>6s} {'target':>7s}         pairs (ratio, c = clean)")
    for key, v in summary["ratios"].items():
        flag = "" if v["clean"] else " *"
        pairs = " ".join(f"{p['ratio']:.2f}{'c' if p['clean'] else ''}" for p in v["pairs"])
        lines.append(
            f"{key + flag:62s} {v['ratio']:6.2f} {'>= ' + str(v['target']):>7s}  "
            f"{'met    ' if v['met'] else 'NOT met'}  {pairs}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="5,000 messages, one run, fewer configurations")
    ap.add_argument(
        "--pg",
        default=os.environ.get("EDGEFLEET_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL server to create a scratch database on ('' to skip PostgreSQL)",
    )
    ap.add_argument("--payloads", default="tiny,window", help="subset of tiny,window")
    ap.add_argument("--modes", default="live,drain", help="subset of live,drain")
    ap.add_argument("--no-raw-reference", action="store_true", help="skip the opaque 300-byte raw run")
    ap.add_argument(
        "--breakdown-messages",
        type=int,
        default=10_000,
        help="windows for the per-stage breakdown, the insert methods and the decode microbench (0: skip)",
    )
    ap.add_argument("--out", default=str(RESULTS / "ingest.json"))
    args = ap.parse_args(argv)
    n, repeat = (5_000, 1) if args.quick else (args.messages, args.repeat)
    dbs = ["sqlite"] + (["postgresql"] if args.pg and _pg_up(args.pg) else [])
    rows: list[dict[str, Any]] = []
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="ef-ingest-bench-") as tmp:
        bench = Bench(Path(tmp), args.pg or None)
        try:
            plan: list[tuple[str, Callable[[], dict[str, Any]]]] = []
            for kind in args.payloads.split(","):
                for mode in args.modes.split(","):
                    plan.append((f"raw {kind} {mode}", functools.partial(bench.raw, kind, n, mode)))
                    for db in dbs:
                        for w in (1, 2):
                            if args.quick and (kind == "window" and w == 2):
                                continue
                            plan.append(
                                (
                                    f"ingest {db} {w}w {kind} {mode}",
                                    functools.partial(bench.ingest, kind, n, mode, db, w),
                                )
                            )
            if not args.no_raw_reference:
                plan.append(("raw opaque300 live", functools.partial(bench.raw, "opaque300", n, "live")))
            for r in range(repeat):
                for label, run in plan:
                    row = run()
                    row["repeat"] = r
                    rows.append(row)
                    print(f"  {label:34s} {row['msg_per_s']:8.0f} msg/s", flush=True)
            stages = _stages(bench, dbs, min(n, args.breakdown_messages)) if args.breakdown_messages else {}
        finally:
            bench.close()
    summary = summarize(rows)
    if stages:
        from bench.ingest_breakdown import explain_gap

        stages["gap_to_target"] = explain_gap(summary["configs"], stages["breakdown_us_per_msg"])
    result = {
        "benchmark": "ingest",
        "messages_per_run": n,
        "repeat": repeat,
        "databases": dbs,
        "machine": machine_block(),
        "duration_s": round(time.time() - t_start, 1),
        "summary": summary,
        **stages,
        "runs": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(format_table(summary))
    if stages:
        print(format_stages(stages))
    print(f"results in {args.out}")
    return result


def _stages(bench: Bench, dbs: list[str], n: int) -> dict[str, Any]:
    """The per-stage breakdown of one worker on realistic windows, the insert methods and the decode
    microbench, measured in the same run as the throughput figures."""
    from bench.decode_bench import measure
    from trainer.ingest.batching import WriterLimits

    batch = WriterLimits().batch_max
    out: dict[str, Any] = {"breakdown_us_per_msg": {}, "insert_methods": {}}
    for db in dbs:
        out["breakdown_us_per_msg"][db] = bench.breakdown(db, "window", n, batch)
        out["insert_methods"][db] = bench.insert_methods(db, "window", n, batch)
        print(f"  breakdown and insert methods {db} done", flush=True)
    watch = CpuWatch(bench.broker)
    out["decode_microbench"] = measure([p for _, p in make_payloads("window", min(n, 2000))])
    out["decode_microbench"]["machine_busy_cores"] = round(watch.stop()["machine_busy_cores"], 2)
    return out


def format_stages(stages: dict[str, Any]) -> str:
    """The breakdown, the insert methods and the decode microbench as tables."""
    from bench.decode_bench import format_table as decode_table
    from bench.ingest_breakdown import STAGES

    bd = stages["breakdown_us_per_msg"]
    cols = [(db, gc) for db in bd for gc in ("gc_tuned", "gc_default")]
    lines = ["", "writer stages, CPU us per 3.5 KB window (one worker's writer, in a fresh process)"]
    lines.append(f"{'stage':22s}" + "".join(f"{db[:6] + ' ' + gc[3:]:>16s}" for db, gc in cols))
    for stage in (*STAGES, "of_which_gc_cpu", "cpu_total"):
        vals = [bd[db][gc]["cpu"].get(stage, bd[db][gc].get(stage, 0.0)) for db, gc in cols]
        lines.append(f"{stage:22s}" + "".join(f"{v:16.1f}" for v in vals))
    lines += ["", "windows insert, us per row (best of rounds): wall, client CPU, server CPU"]
    for db, res in stages["insert_methods"].items():
        for name, v in res["methods"].items():
            lines.append(
                f"  {db:10s} {name:42s} {v['wall_us_per_row']:7.1f} {v['client_cpu_us_per_row']:7.1f} "
                f"{v['server_cpu_us_per_row']:7.1f}"
            )
    lines += ["", decode_table(stages["decode_microbench"]), "", "gap to 0.8x raw (drain, window, 1 worker):"]
    for db, g in stages.get("gap_to_target", {}).items():
        lines.append(f"  {db}: " + ", ".join(f"{k} {v}" for k, v in g.items()))
    return "\n".join(lines)


def machine_block() -> dict[str, Any]:
    """The machine the figures come from: cores, CPU model and flags, Python, OS."""
    from bench.accuracy_bench import cpu_flags

    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "cpu_flags": cpu_flags(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _pg_up(url: str) -> bool:
    try:
        import psycopg
        from sqlalchemy.engine import make_url

        u = make_url(url)
        with psycopg.connect(
            host=u.host, port=u.port or 5432, user=u.username, dbname=u.database, connect_timeout=3
        ):
            return True
    except Exception:  # noqa: BLE001
        print(f"PostgreSQL at {url} unavailable: SQLite only")
        return False


if __name__ == "__main__":
    main()
