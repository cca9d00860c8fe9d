"""Where one ingest worker's time per message goes, stage by stage, on the bench's realistic windows.

bench/ingest_bench.py measures whole workers (throughput, CPU of each process). This module explains
the gap to the raw paho rate: it drives the real writer (:class:`~trainer.ingest.batching.BatchWriter`,
its ``_process`` on batches of ``batch_max`` messages, as the writer thread does) in this process, on a
fresh database, with timers wrapped around the stages it calls (the functions themselves run
unchanged):

* decode + validate: :func:`~trainer.ingest.routing.classify` (topic checks, pydantic
  ``model_validate_json``, UTF-8 text kept for the payload column);
* store checks: the device's registered fleet and the histogram bins of its model;
* row building: :func:`~trainer.store.ingest_writes.write_windows` less the statements it runs;
* insert: the windows ``bulk_insert`` (COPY + INSERT .. SELECT .. ON CONFLICT on PostgreSQL,
  executemany on SQLite); devices upsert; model checks and alerts;
* begin (SQLite: the write lock and BEGIN IMMEDIATE), commit, ack (:func:`send_pubacks`).

Each stage is reported as CPU of this thread (``cpu``; what competes for the worker's GIL) and wall
time (``wall``; includes waiting for PostgreSQL). Paho's receive cost is not here: the raw subscriber
of the same bench run measures it (``consumer_us_per_msg`` of ``raw``). :func:`insert_methods`
compares ways to insert the windows rows (step 3 of the issue's item 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

STAGES = (
    "decode_validate",
    "store_checks",
    "row_building",
    "insert_windows",
    "devices_upsert",
    "model_checks_alerts",
    "dead_letters",
    "begin",
    "commit",
    "ack",
    "writer_other",
)


class _Clock:
    """Inclusive CPU and wall seconds per stage name."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        c, w = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu[name] += time.thread_time() - c
            self.wall[name] += time.perf_counter() - w

    def wrap(self, name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            with self.stage(name(*a, **kw) if callable(name) else name):
                return fn(*a, **kw)

        return timed


@contextlib.contextmanager
def _patched(clock: _Clock, writer: Any) -> Iterator[None]:
    """Timers around the stages the writer calls (module attributes restored afterwards)."""
    import trainer.ingest.batching as batching
    import trainer.store.ingest_writes as iw

    saved = {
        (batching, "classify"): batching.classify,
        (iw, "bulk_insert"): iw.bulk_insert,
        (iw, "_upsert_devices_from_windows"): iw._upsert_devices_from_windows,
        (iw, "since_removal"): iw.since_removal,
        (iw, "_model_alerts"): iw._model_alerts,
        (batching, "write_dead_letters"): batching.write_dead_letters,
    }
    names = {
        "classify": "decode_validate",
        "_upsert_devices_from_windows": "devices_upsert",
        "since_removal": "devices_upsert_removed",
        "_model_alerts": "model_checks_alerts",
        "write_dead_letters": "dead_letters",
    }
    for (mod, attr), fn in saved.items():
        if attr == "bulk_insert":
            setattr(mod, attr, clock.wrap(lambda conn, table, *a, **kw: f"bulk_insert_{table}", fn))
        else:
            setattr(mod, attr, clock.wrap(names[attr], fn))
    writer._check.known = clock.wrap("model_checks_known", writer._check.known)
    writer._store_checks = clock.wrap("store_checks", writer._store_checks)
    tele = writer.kinds["tele"]
    writer.kinds["tele"] = dataclasses.replace(tele, write=clock.wrap("write_windows", tele.write))
    try:
        yield
    finally:
        for (mod, attr), fn in saved.items():
            setattr(mod, attr, fn)


def _timed_write(clock: _Clock, write: Callable[[], Any]) -> Callable[[], Any]:
    """``Store.write`` with its entry (begin) and exit (commit) timed apart from the work inside."""

    @contextlib.contextmanager
    def timed() -> Iterator[Any]:
        cm = write()
        with clock.stage("begin"):
            conn = cm.__enter__()
        try:
            yield conn
        except BaseException as exc:
            cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        with clock.stage("commit"):
            cm.__exit__(None, None, None)

    return timed


def _exclusive(t: dict[str, float], n: int) -> dict[str, float]:
    """Inclusive timers -> exclusive microseconds per message for each of STAGES."""
    s = dict(t)
    out = {
        "decode_validate": s.get("decode_validate", 0.0),
        "store_checks": s.get("store_checks", 0.0),
        "insert_windows": s.get("bulk_insert_windows", 0.0),
        "devices_upsert": s.get("devices_upsert", 0.0) + s.get("devices_upsert_removed", 0.0),
        "model_checks_alerts": s.get("model_checks_alerts", 0.0) + s.get("model_checks_known", 0.0),
        "dead_letters": s.get("dead_letters", 0.0),
        "begin": s.get("begin", 0.0),
        "commit": s.get("commit", 0.0),
        "ack": s.get("ack", 0.0),
    }
    inner = out["insert_windows"] + out["devices_upsert"] + out["model_checks_alerts"]
    out["row_building"] = max(0.0, s.get("write_windows", 0.0) - inner)
    out["writer_other"] = max(0.0, s.get("process", 0.0) - sum(out.values()))
    return {k: round(out[k] / n * 1e6, 1) for k in STAGES}


@contextlib.contextmanager
def _gc_timer(clock: _Clock) -> Iterator[None]:
    """Time the cyclic garbage collector's passes (they run inside whichever stage allocates)."""
    import gc

    started: list[tuple[float, float]] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append((time.thread_time(), time.perf_counter()))
        elif started:
            c, w = started.pop()
            clock.cpu["gc"] += time.thread_time() - c
            clock.wall["gc"] += time.perf_counter() - w
            clock.cpu["gc_full_collections"] += info["generation"] == 2

    gc.callbacks.append(on_gc)
    try:
        yield
    finally:
        gc.callbacks.remove(on_gc)


def breakdown_child(url: str, payload_file: str, batch: int, tuned_gc: bool, out: Any) -> None:
    """Run :func:`breakdown` in a fresh process, like a worker's (``tuned_gc``: as ``run_worker`` sets it)."""
    import pickle

    import trainer.ingest.worker  # noqa: F401 - the worker's imports, before the GC is tuned
    from trainer.ingest.processes import tune_gc

    with open(payload_file, "rb") as f:
        msgs = pickle.load(f)
    if tuned_gc:
        tune_gc()
    out.put(breakdown(url, msgs, batch))


def breakdown(url: str, msgs: list[tuple[str, bytes]], batch: int) -> dict[str, Any]:
    """Stage costs (CPU and wall, microseconds per message) of storing ``msgs`` on a fresh ``url``.

    ``gc`` is the cyclic collector's share, already inside the stages it interrupted."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from bench.ingest_bench import _bench_manifest
    from edge_agent.protocol import TelemetryWindow
    from trainer.ingest.batching import BatchWriter, Inbound, WriterLimits
    from trainer.ingest.routing import KINDS
    from trainer.ingest.worker import send_pubacks
    from trainer.sim.windows import model_ref
    from trainer.store import Store

    clock = _Clock()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)  # never connected: only queues

    def ack(items: Any) -> tuple[int, int]:
        with clock.stage("ack"):
            send_pubacks(client, [m.ref for m in items])
        return len(items), 0

    with Store(url) as store:
        store.register_model(_bench_manifest(), model_ref().sha256, actor="bench")
        writer = BatchWriter(store, {"tele": KINDS["tele"]}, name="bd", limits=WriterLimits(), ack=ack)
        store.write = _timed_write(clock, store.write)  # type: ignore[method-assign]
        inbound = [Inbound(t, p, time.time(), (i % 65535) + 1) for i, (t, p) in enumerate(msgs)]
        with _patched(clock, writer), _gc_timer(clock):
            for i in range(0, len(inbound), batch):
                with clock.stage("process"):
                    writer._process(inbound[i : i + batch])
        stored = store.count_windows()
    assert stored == len(msgs), (stored, len(msgs))
    n = len(msgs)
    validate = [p for _, p in msgs]
    c = time.thread_time()
    for p in validate:
        TelemetryWindow.model_validate_json(p)
    pyd = (time.thread_time() - c) / n * 1e6
    cpu, wall = _exclusive(clock.cpu, n), _exclusive(clock.wall, n)
    return {
        "messages": n,
        "batch": batch,
        "cpu": cpu,
        "wall": wall,
        "cpu_total": round(sum(cpu.values()), 1),
        "wall_total": round(sum(wall.values()), 1),
        "of_which_gc_cpu": round(clock.cpu["gc"] / n * 1e6, 1),
        "of_which_gc_wall": round(clock.wall["gc"] / n * 1e6, 1),
        "gc_full_collections": int(clock.cpu["gc_full_collections"]),
        "of_decode_validate_pydantic_model_validate_json_cpu": round(pyd, 1),
    }


# -- insert methods ------------------------------------------------------------------------------
def _rows(msgs: list[tuple[str, bytes]]) -> list[tuple[Any, ...]]:
    """The windows rows ingest would write for ``msgs`` (same columns, same values)."""
    from edge_agent.protocol import TelemetryWindow

    out = []
    for _, p in msgs:
        w = TelemetryWindow.model_validate_json(p)
        m = w.model
        out.append(
            (
                w.fleet, w.device, w.session, w.seq, w.start, w.end, m.name, m.version, m.sha256,
                m.artifact, w.frames.inferred, w.frames.failed, w.confidence_mean, w.atc_above, True,
                p.decode(), time.time(),
            )
        )  # fmt: skip
    return out


def _insertmanyvalues(conn: Any, rows: list[tuple[Any, ...]]) -> int:
    """SQLAlchemy Core executemany of INSERT .. ON CONFLICT DO NOTHING RETURNING id: SQLAlchemy's
    ``insertmanyvalues`` (multi-row VALUES pages); RETURNING is how it tells which rows were new."""
    from sqlalchemy.dialects import postgresql, sqlite

    from trainer.store.ingest_writes import WINDOW_COLUMNS, WINDOWS

    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(WINDOWS)
        .on_conflict_do_nothing(index_elements=["device", "session", "seq"])
        .returning(WINDOWS.c.id)
    )
    params = [dict(zip(WINDOW_COLUMNS, r, strict=True)) for r in rows]
    return len(conn.execute(stmt, params).all())


def _driver_executemany(conn: Any, rows: list[tuple[Any, ...]]) -> int:
    """The DBAPI's own executemany of INSERT .. ON CONFLICT DO NOTHING (psycopg 3: pipelined)."""
    from trainer.store.ingest_writes import WINDOW_COLUMNS

    q = conn.dialect.identifier_preparer.quote
    marks = ", ".join(["?" if conn.dialect.paramstyle == "qmark" else "%s"] * len(WINDOW_COLUMNS))
    sql = (
        f"INSERT INTO windows ({', '.join(q(c) for c in WINDOW_COLUMNS)}) VALUES ({marks}) "
        "ON CONFLICT (device, session, seq) DO NOTHING"
    )
    return int(conn.exec_driver_sql(sql, rows).rowcount)


def insert_methods_child(url: str, payload_file: str, batch: int, out: Any) -> None:
    """Run :func:`insert_methods` in a fresh process with a worker's GC settings."""
    import pickle

    import trainer.ingest.worker  # noqa: F401 - the worker's imports, before the GC is tuned
    from trainer.ingest.processes import tune_gc

    with open(payload_file, "rb") as f:
        msgs = pickle.load(f)
    tune_gc()
    out.put(insert_methods(url, msgs, batch))


def explain_gap(configs: dict[str, Any], breakdowns: dict[str, Any]) -> dict[str, Any]:
    """Per database: the raw subscriber's CPU per window (paho receive + automatic PUBACK), the ingest
    worker's, what the writer stages account for (the breakdown) and the rest (ingest's network thread
    beyond raw paho: Inbound, buffer hand-off; thread switches, stats); and the budget: the CPU per
    message a one-process worker could spend at 0.8x the raw drain rate (it is GIL-bound)."""
    raw = (configs.get("raw|window|drain") or {}).get("cpu_of_best") or {}
    raw_best = (configs.get("raw|window|drain") or {}).get("best")
    out: dict[str, Any] = {}
    for db, bd in breakdowns.items():
        worker = (configs.get(f"ingest-{db}-1w|window|drain") or {}).get("cpu_of_best") or {}
        if not raw or not worker:
            continue
        paho, total = raw["consumer_us_per_msg"], worker["consumer_us_per_msg"]
        writer = bd["gc_tuned"]["cpu_total"]
        out[db] = {
            "raw_consumer_paho_receive_us": paho,
            "ingest_worker_us": total,
            "writer_stages_us (breakdown, tuned GC)": writer,
            "rest_us (network thread beyond raw paho, hand-off, stats)": round(total - paho - writer, 1),
            "budget_us_at_0.8x_raw": round(1e6 / (0.8 * raw_best), 1) if raw_best else None,
        }
    return out


def insert_methods(url: str, msgs: list[tuple[str, bytes]], batch: int, rounds: int = 3) -> dict[str, Any]:
    """Each way of inserting the windows rows, in batches of ``batch`` in one transaction each, on a
    fresh table per round; then every batch again (all duplicates) to check each counts them.
    Client CPU, wall and (PostgreSQL) server CPU per row; the best of ``rounds``."""
    from sqlalchemy import text

    from bench.ingest_bench import _postgres_cpu_s
    from trainer.store import Store
    from trainer.store.engine import bulk_insert
    from trainer.store.ingest_writes import WINDOW_COLUMNS

    def current(conn: Any, rows: list[tuple[Any, ...]]) -> int:
        return bulk_insert(conn, "windows", WINDOW_COLUMNS, ("device", "session", "seq"), rows)

    methods: dict[str, Callable[[Any, list[tuple[Any, ...]]], int]] = {"bulk_insert (current)": current}
    methods["sqlalchemy insertmanyvalues + RETURNING"] = _insertmanyvalues
    methods["driver executemany"] = _driver_executemany
    rows = _rows(msgs)
    n = len(rows)
    out: dict[str, Any] = {}
    with Store(url) as store:
        pg = store.dialect == "postgresql"
        if not pg:
            del methods["driver executemany"]  # that is what bulk_insert does on SQLite
        runs: dict[str, list[dict[str, float]]] = defaultdict(list)
        for _ in range(rounds):
            for name, fn in methods.items():
                with store.write() as conn:
                    conn.execute(text("DELETE FROM windows"))
                pg0, c0, w0 = _postgres_cpu_s() if pg else 0.0, time.thread_time(), time.perf_counter()
                stored = 0
                for i in range(0, n, batch):
                    with store.write() as conn:
                        stored += fn(conn, rows[i : i + batch])
                wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
                server = (_postgres_cpu_s() - pg0) if pg else 0.0
                dups = 0
                for i in range(0, n, batch):
                    with store.write() as conn:
                        dups += len(rows[i : i + batch]) - fn(conn, rows[i : i + batch])
                assert (stored, dups) == (n, n), (name, stored, dups)
                runs[name].append(
                    {"wall_us_per_row": wall / n * 1e6, "client_cpu_us_per_row": cpu / n * 1e6,
                     "server_cpu_us_per_row": server / n * 1e6}
                )  # fmt: skip
        for name, rs in runs.items():
            best = min(rs, key=lambda r: r["wall_us_per_row"])
            out[name] = {k: round(v, 1) for k, v in best.items()}
            out[name]["wall_us_per_row_median"] = round(
                statistics.median(r["wall_us_per_row"] for r in rs), 1
            )
    return {"rows": n, "batch": batch, "rounds": rounds, "methods": out}
