"""Console benchmark: server time of the fleet page and of one device's 30-day chart on a store of
1,000 devices and 30 days of 60 s windows (as the retention policy leaves it: hourly and daily
roll-ups for 30 days, raw windows for the newest hour), against a plain SQL query of the same rows
in the same run. Goal: p95 <= 200 ms.

Seeding 43 million raw windows is not what a deployed store holds (raw windows older than
``retention.keep_raw_days`` are purged once rolled up), so roll-ups are written directly: the
measured devices get real merged payloads (the agent's aggregator, exact merges), the other devices
a minimal valid payload, so the tables have their full row counts at a size this machine seeds in a
minute. ``python -m bench.console_bench [--devices N] [--days D] [--db URL]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select

from bench.accuracy_bench import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HOUR, DAY = 3600.0, 86400.0
MEASURED = 20
"""Devices whose charts are timed (each with real roll-up payloads)."""


def log(msg: str) -> None:
    print(f"[console-bench] {msg}", file=sys.stderr, flush=True)


def _payloads(seed: Any, now: float) -> tuple[str, str, list[Any]]:
    """A real hourly merged payload, a minimal one, and an hour of real raw windows (one device)."""
    from edge_agent.telemetry.merge import merge_to_window
    from trainer.sim.tiny import LABELS
    from trainer.sim.windows import windows

    ws = windows(
        "cam-x",
        60,
        fleet=seed.fleet,
        model=_ref(seed),
        frames_per_window=12,
        start=now - HOUR,
        window_s=60.0,
        num_classes=len(LABELS),
        edges=seed.champion.manifest.telemetry_edges,
    )
    full = merge_to_window(ws, "cam-x").model_dump_json(exclude_none=True)
    lean = ws[0].model_copy(update={"histograms": {}, "latency_ms": {}}).model_dump_json(exclude_none=True)
    return full, lean, ws


def _ref(seed: Any) -> Any:
    from edge_agent.protocol import ModelRef

    m = seed.champion.manifest
    return ModelRef(name=m.name, version=m.version, sha256=seed.champion.sha256, artifact="onnx-fp32")


def _seed_fleet(store: Any, seed: Any, devices: int, days: int, now: float) -> list[str]:
    """Device, health, hourly and daily roll-up rows for ``devices`` devices over ``days`` days, and raw
    windows of the newest hour for the measured ones."""
    from trainer.store.schema import Device, DeviceHealthRecord, RollupCursor, WindowRollup

    full, lean, raw = _payloads(seed, now)
    names = [f"dev-{i:05d}" for i in range(devices)]
    top = (now // HOUR) * HOUR
    sha = seed.champion.sha256
    with store.write() as conn:
        conn.execute(
            insert(Device),
            [
                {
                    "device": d,
                    "fleet": seed.fleet,
                    "first_seen": now - days * DAY,
                    "last_seen": now - (i % 90),
                    "last_window_end": now - 30,
                    "session": 1,
                    "state": "offline" if i % 10 == 9 else "online",
                    "status_ts": now - 100,
                    "agent_version": "0.1.0",
                    "model_name": seed.champion.manifest.name,
                    "model_version": seed.champion.manifest.version,
                    "model_sha256": sha,
                }
                for i, d in enumerate(names)
            ],
        )
        conn.execute(
            insert(DeviceHealthRecord),
            [
                {
                    "device": d,
                    "fleet": seed.fleet,
                    "model_sha256": sha,
                    "drift_state": ("drift" if i % 17 == 0 else "ok"),
                    "reference": "training",
                    "estimated_accuracy": 0.8 + (i % 13) / 100,
                    "low": None,
                    "high": None,
                    "method": "calibrated",
                    "labels": 0,
                    "frames_per_second": 0.2,
                    "confidence_mean": 0.8,
                    "updated_at": now,
                }
                for i, d in enumerate(names)
            ],
        )
    for k, d in enumerate(names):
        payload = full if k < MEASURED else lean
        rows = [
            _rollup_row(seed.fleet, d, sha, "hour", top - h * HOUR, HOUR, payload)
            for h in range(1, days * 24 + 1)
        ]
        rows += [
            _rollup_row(seed.fleet, d, sha, "day", (top // DAY) * DAY - j * DAY, DAY, payload)
            for j in range(1, days + 1)
        ]
        with store.write() as conn:
            conn.execute(insert(WindowRollup), rows)
        if k < MEASURED:
            store.add_windows([w.model_copy(update={"device": d}) for w in raw])
        if k % 100 == 0:
            log(f"seeded {k}/{devices} devices")
    with store.write() as conn:
        conn.execute(
            insert(RollupCursor),
            [{"period": "hour", "rolled_until": top}, {"period": "day", "rolled_until": (top // DAY) * DAY}],
        )
    return names[:MEASURED]


def _rollup_row(
    fleet: str, device: str, sha: str, period: str, start: float, span: float, payload: str
) -> dict[str, Any]:
    return {
        "fleet": fleet,
        "device": device,
        "model_sha256": sha,
        "period": period,
        "start": start,
        "windows": int(span // 60),
        "frames_inferred": int(span // 60) * 12,
        "frames_failed": 0,
        "span_s": span,
        "confidence_mean": 0.8,
        "estimated_accuracy": 0.85,
        "payload": payload,
    }


def _times(fn: Any, n: int) -> dict[str, float]:
    """p50/p95 of ``fn``'s time: the server's own (its Server-Timing header) when ``fn`` returns a
    response, else the wall time of the call (plain SQL)."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        got = fn()
        wall = 1000 * (time.perf_counter() - t)
        timing = got.headers.get("server-timing", "") if got is not None else ""
        out.append(float(timing.split("dur=")[1]) if "dur=" in timing else wall)
    out.sort()
    return {
        "p50_ms": round(statistics.median(out), 2),
        "p95_ms": round(out[max(0, int(0.95 * len(out)) - 1)], 2),
        "n": n,
    }


def _measure(s: Any, measured: list[str], now: float, days: int, n: int) -> dict[str, Any]:
    """Server time of each console read (in-process ASGI calls) beside the plain SQL of the same rows."""
    from trainer.store.schema import Device, DeviceHealthRecord, WindowRollup

    c = s.client("viewer")
    since = now - days * DAY
    i = iter(range(10**9))

    def device() -> str:
        return measured[next(i) % len(measured)]

    def ok(path: str) -> Any:
        r = c.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
        return r

    def fleet_sql() -> None:
        with s.store.engine.connect() as conn:
            q = select(Device, DeviceHealthRecord).outerjoin(
                DeviceHealthRecord, DeviceHealthRecord.device == Device.device
            )
            conn.execute(select(func.count()).select_from(Device)).scalar()
            conn.execute(q.order_by(Device.device).limit(50)).all()

    def chart_sql() -> None:
        with s.store.engine.connect() as conn:
            conn.execute(
                # the same 720 hourly rows, their numeric columns: the least any chart of them reads
                select(
                    WindowRollup.start,
                    WindowRollup.frames_inferred,
                    WindowRollup.frames_failed,
                    WindowRollup.span_s,
                    WindowRollup.confidence_mean,
                    WindowRollup.estimated_accuracy,
                ).where(
                    WindowRollup.device == device(),
                    WindowRollup.period == "hour",
                    WindowRollup.start >= since,
                )
            ).all()

    return {
        "fleet_page_html": _times(lambda: ok("/fleet"), n),
        "fleet_api_devices": _times(lambda: ok("/api/v1/devices?limit=50"), n),
        "fleet_plain_sql": _times(fleet_sql, n),
        "device_chart_30d_api": _times(
            lambda: ok(f"/api/v1/devices/{device()}/series?since={since}&until={now}"), n
        ),
        "device_page_30d_html": _times(lambda: ok(f"/devices/{device()}?range=30d"), n),
        "device_chart_plain_sql": _times(chart_sql, n),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.console_bench", description=__doc__)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument(
        "--dialects",
        default="sqlite,postgresql",
        help="comma-separated: sqlite (a fresh file under build/) and/or postgresql (a fresh database "
        f"on {PG_SERVER}, EDGEFLEET_BENCH_PG)",
    )
    args = ap.parse_args(argv)
    for dialect in args.dialects.split(","):
        _run(dialect.strip(), args)
    return 0


PG_SERVER = os.environ.get("EDGEFLEET_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _fresh_db(dialect: str, work: Path) -> str:
    """A URL of an empty database for this run."""
    if dialect == "sqlite":
        return f"sqlite:///{work / 'console.db'}"
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(PG_SERVER)
    kw = {
        "host": u.host,
        "port": u.port or 5432,
        "user": u.username,
        "dbname": u.database,
        "autocommit": True,
    }
    with psycopg.connect(**kw) as conn:
        conn.execute('DROP DATABASE IF EXISTS "ef_console_bench" WITH (FORCE)')
        conn.execute('CREATE DATABASE "ef_console_bench"')
    return u.set(database="ef_console_bench").render_as_string(hide_password=False)


def _run(dialect: str, args: argparse.Namespace) -> None:
    import shutil

    from tests.console_fixtures import Seeded
    from trainer.sim.console_seed import seed_console
    from trainer.store import Store

    work = ROOT / "build" / "bench-console"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = Store(_fresh_db(dialect, work))
    now = time.time()
    t0 = time.perf_counter()
    seed = seed_console(store, work / "seed", devices=4, hours=1.0, now=now)
    measured = _seed_fleet(store, seed, args.devices, args.days, now)
    seeded_s = time.perf_counter() - t0
    log(f"seeded in {seeded_s:.0f} s; measuring")
    results = _measure(Seeded(store, seed), measured, now, args.days, args.requests)
    doc = {
        "bench": "console",
        "devices": args.devices,
        "days": args.days,
        "dialect": store.dialect,
        "seed_s": round(seeded_s, 1),
        "goal": "p95 <= 200 ms for the fleet page and a device's 30-day chart",
        "results": results,
        "cpu_flags": cpu_flags(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"console-{store.dialect}.json").write_text(json.dumps(doc, indent=1))
    print(f"{store.dialect}: {args.devices} devices, {args.days} days")
    print(f"{'read':28} {'p50 ms':>8} {'p95 ms':>8}")
    for name, r in results.items():
        print(f"{name:28} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f}")
    store.close()


if __name__ == "__main__":
    sys.exit(main())
