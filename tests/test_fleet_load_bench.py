"""bench/fleet_load_bench.py cannot rot: its quick mode against a private mosquitto (mutual TLS, the ACL)
with real ingest workers on PostgreSQL connects every simulated device, stores every window it sent once,
and records lag, the drift and health steps, the console's reads and each process's memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.fleet_load_bench import main
from trainer.ops.broker import find_mosquitto

from .conftest import _pg_admin_url, require

DEVICES = 200


def test_quick_run_on_mosquitto_stores_every_window_once_and_records_the_figures(tmp_path: Path) -> None:
    require(find_mosquitto() is not None, "the mosquitto binary")
    pg = _pg_admin_url()
    require(pg is not None, "PostgreSQL on 127.0.0.1:5432")
    out = tmp_path / "fleet_load.json"
    argv = ["--quick", "--brokers", "mosquitto", "--devices", str(DEVICES), "--seconds", "20"]
    argv += ["--requests", "2", "--work", str(tmp_path / "work"), "--out", str(out)]
    argv += ["--db-name", f"ef_fleet_load_test_{os.getpid()}", "--pg", str(pg)]
    code = main(argv)
    doc = json.loads(out.read_text())
    r = doc["results"]["mosquitto"]
    assert "error" not in r, r
    assert code == 0
    assert r["connected"] == DEVICES and r["connect_failures"] == 0 and r["refused_subscriptions"] == 0
    # 10 s period for 20 s: two windows per device, every one acknowledged, stored, and stored once
    assert r["scheduled"] == r["sent"] == r["stored"] == 2 * DEVICES
    assert r["missing"] == 0 and r["missing_acknowledged"] == 0 and r["unacked"] == 0
    assert r["lag"]["committed_s"]["n"] == r["sent"] and r["lag"]["committed_s"]["p50"] is not None
    assert r["drift"]["assessed"] >= DEVICES and r["drift"]["health_rows"] >= DEVICES
    assert all(v["server_p50_ms"] is not None for k, v in r["console"].items() if k != "rss_mb")
    assert {"mosquitto", "ingest-worker-0", "ingest-worker-1", "simulator-0"} <= set(r["rss_mb"])
    assert doc["cpu_flags"] is not None and doc["machine"]["cores"]
