"""`python -m bench.soak_bench`: a fault soak of the fleet side. Nothing may be lost; each window stored once.

50 simulated devices (the agent's real MQTT link and durable spool, one window per device per
``--period`` seconds) publish to a private mosquitto; ``edgefleet ingest run`` stores them in a private
PostgreSQL, by default as deploy/trainer.yaml runs it: one worker on a plain durable subscription
(``--shared --workers 2`` soaks the shared subscription instead, which mosquitto before 2.0.12 does not
restore after a restart). During ``--seconds``:

* the broker is restarted (down for 5 s) at 20% of the run,
* the database is stopped for ``--db-down`` seconds (60) from 40%,
* one device floods junk on its own telemetry topic all along (``--junk-rate`` messages/s).

Then the devices stop (their spools flushed) and ingest drains. Reported: windows sent, stored, lost,
duplicates received (a second copy cannot be stored: (device, session, seq) is unique), dead letters kept and dropped over the caps, and the ingest processes' memory (RSS)
after warm-up and at the end. Results: ``bench/results/soak-<workers>w-<shared|plain>.json`` and a table;
the exit code is 1 when a window was lost (``make bench`` then fails).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FLEET = "soak"


class _Device:
    """One simulated device: the agent's MqttLink and Spool, fed pre-rendered windows."""

    def __init__(self, name: str, url: str, work: Path, period: float) -> None:
        from edge_agent.config import MqttSettings
        from edge_agent.events import EventCounter
        from edge_agent.mqtt_link import MqttLink
        from edge_agent.protocol import Status, status_topic
        from edge_agent.spool import Spool

        self.name, self.period, self.sent = name, period, 0
        events = EventCounter()
        self.spool = Spool(work / f"{name}.sqlite", 100_000, 1 << 28, events=events)
        online = Status(fleet=FLEET, device=name, state="online", session=1, ts=time.time())
        self.link = MqttLink(
            MqttSettings(url=url, reconnect_min_s=0.2, reconnect_max_s=2.0),
            client_id=name,
            status_topic=status_topic(FLEET, name),
            birth=lambda _n: online.model_copy(update={"ts": time.time()}).to_bytes(),
            will=online.model_copy(update={"state": "offline"}).to_bytes(),
            spool=self.spool,
            events=events,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"soak-{name}", daemon=True)

    def start(self) -> None:
        self.link.start()
        self._thread.start()

    def _run(self) -> None:
        from edge_agent.protocol import tele_topic
        from trainer.sim.windows import tiny_window

        t0 = time.monotonic()
        while not self._stop.is_set():
            w = tiny_window(self.name, self.sent, fleet=FLEET)
            self.link.publish_spooled(tele_topic(FLEET, self.name), w.to_bytes())
            self.sent += 1
            self._stop.wait(max(0.0, t0 + self.sent * self.period - time.monotonic()))

    def stop(self, flush_s: float) -> bool:
        self._stop.set()
        self._thread.join()
        return self.link.stop(flush_timeout=flush_s)


def _junk(port: int, rate: float, stop: threading.Event, counter: list[int]) -> None:
    """A device flooding its own telemetry topic with junk (distinct payloads: they cannot count up)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="junk-0", protocol=mqtt.MQTTv311)
    c.max_queued_messages_set(10_000)
    c.connect_async("127.0.0.1", port)
    c.loop_start()
    t0 = time.monotonic()
    while not stop.is_set():
        c.publish(
            f"ef/v1/{FLEET}/dev/junk-0/tele", f"junk {counter[0]} {os.urandom(8).hex()}".encode(), qos=0
        )
        counter[0] += 1
        stop.wait(max(0.0, t0 + counter[0] / rate - time.monotonic()))
    c.loop_stop()
    c.disconnect()


def _rss_mb(pids: list[int]) -> float:
    """Resident memory of processes (MB, from /proc)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def _ingest_pids(sup: subprocess.Popen) -> list[int]:
    """The supervisor and its worker processes."""
    children = Path(f"/proc/{sup.pid}/task/{sup.pid}/children")
    kids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return [sup.pid, *kids]


def _gaps(lost: set[tuple[str, int]]) -> dict[str, list[int]]:
    """The lost windows' sequence numbers per device (a gap shows when it happened)."""
    out: dict[str, list[int]] = {}
    for dev, seq in sorted(lost):
        out.setdefault(dev, []).append(seq)
    return out


def _stats(work: Path, index: int) -> dict:
    try:
        return json.loads((work / f"stats-{index}.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.5)
    return pred()


def run(args: argparse.Namespace) -> dict:
    logging.getLogger("edge_agent").setLevel(logging.ERROR)  # 50 links reconnecting would flood the output
    from tests.pg_helpers import PrivatePostgres, find_pg_bin
    from trainer.ops.broker import MosquittoBroker
    from trainer.store import Store

    pg_bin = find_pg_bin()
    if pg_bin is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are needed for the database outage")
    work = Path(tempfile.mkdtemp(prefix="ef-soak-"))
    pg = PrivatePostgres(pg_bin).init()
    pg.start()
    broker = MosquittoBroker(work / "broker").start()
    Store(pg.url).close()
    log_file = (work / "ingest.log").open("w")  # noqa: SIM115 - closed with the run
    sup = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "ingest", "run", "--broker", broker.url, "--db", pg.url,
         "--fleet", FLEET, "--workers", str(args.workers), "--stats-file", str(work / "stats-{index}.json"),
         *([] if args.shared else ["--no-shared"])],
        cwd=work, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True,
    )  # fmt: skip
    # messages sent before ingest first subscribes have nowhere to go: start the devices after it
    _wait(lambda: all(_stats(work, i).get("connects", 0) >= 1 for i in range(args.workers)), 60)
    time.sleep(1.0)
    devices = [_Device(f"cam-{i:02d}", broker.url, work, args.period) for i in range(args.devices)]
    stop_junk, junk_sent = threading.Event(), [0]
    junk = threading.Thread(
        target=_junk, args=(broker.port, args.junk_rate, stop_junk, junk_sent), daemon=True
    )
    timeline: list[str] = []
    try:
        for d in devices:
            d.start()
        junk.start()
        time.sleep(min(15.0, args.seconds * 0.1))
        rss_before = _rss_mb(_ingest_pids(sup))
        t0 = time.monotonic()
        faults = [(0.2, "broker restart"), (0.4, "database down")]
        for at, what in faults:
            time.sleep(max(0.0, t0 + at * args.seconds - time.monotonic()))
            timeline.append(f"{time.monotonic() - t0:.0f} s: {what}")
            print(timeline[-1], flush=True)
            if what == "broker restart":
                broker.restart(down_seconds=5.0)
            else:
                pg.stop()
                time.sleep(args.db_down)
                pg.start()
                timeline.append(f"{time.monotonic() - t0:.0f} s: database back")
        time.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
        stop_junk.set()
        flushed = all(d.stop(flush_s=60.0) for d in devices)
        sent = {d.name: d.sent for d in devices}
        with Store(pg.url, create=False) as store:
            _wait(lambda: store.count_windows() >= sum(sent.values()), 120)
            time.sleep(3.0)
            keys = store.window_keys()
            dead = store.dead_letters()
        rss_after = _rss_mb(_ingest_pids(sup))
    finally:
        os.killpg(sup.pid, signal.SIGTERM)
        try:
            sup.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(sup.pid, signal.SIGKILL)
        broker.stop()
        if pg.running():
            pg.stop()
        log_file.close()
    stored = {(dev, seq) for dev, _session, seq in keys}
    expected = {(name, i) for name, n in sent.items() for i in range(n)}
    from trainer.store.ingest_writes import OVERFLOW_SHA256

    return {
        "devices": args.devices,
        "seconds": args.seconds,
        "period_s": args.period,
        "timeline": timeline,
        "windows_sent": sum(sent.values()),
        "windows_stored": len(stored & expected),
        "windows_lost": len(expected - stored),
        "duplicates_received": sum(_stats(work, i).get("duplicates", 0) for i in range(args.workers)),
        "ingest_received": sum(_stats(work, i).get("received", 0) for i in range(args.workers)),
        "ingest_workers": args.workers,
        "shared_subscription": args.shared,
        "lost_by_device": _gaps(expected - stored),
        "spools_flushed": flushed,
        "junk_sent": junk_sent[0],
        "dead_letters_kept": sum(d.count for d in dead if d.payload_sha256 != OVERFLOW_SHA256),
        "dead_letters_over_cap": sum(d.count for d in dead if d.payload_sha256 == OVERFLOW_SHA256),
        "dead_letter_rows": len(dead),
        "ingest_rss_mb_before": rss_before,
        "ingest_rss_mb_after": rss_after,
    }


def format_table(r: dict) -> str:
    rows = [
        (
            "ingest",
            f"{r['ingest_workers']} worker(s), {'shared' if r['shared_subscription'] else 'plain'} subscription",
        ),
        ("devices x seconds", f"{r['devices']} x {r['seconds']:.0f} s (a window every {r['period_s']} s)"),
        ("faults", "; ".join(r["timeline"])),
        (
            "windows sent / stored / lost",
            f"{r['windows_sent']} / {r['windows_stored']} / {r['windows_lost']}",
        ),
        ("duplicates received (stored once: unique key)", str(r["duplicates_received"])),
        (
            "junk sent / dead letters kept / over cap",
            f"{r['junk_sent']} / {r['dead_letters_kept']} / {r['dead_letters_over_cap']}",
        ),
        ("dead-letter rows", str(r["dead_letter_rows"])),
        ("ingest RSS before / after (MB)", f"{r['ingest_rss_mb_before']} / {r['ingest_rss_mb_after']}"),
    ]
    return "\n".join(f"{k:<42} {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--period", type=float, default=2.0, help="seconds between a device's windows")
    ap.add_argument("--db-down", type=float, default=60.0)
    ap.add_argument("--junk-rate", type=float, default=200.0)
    ap.add_argument("--workers", type=int, default=1, help="ingest worker processes (more need --shared)")
    ap.add_argument(
        "--shared",
        action="store_true",
        help="ingest on the shared subscription ($share/ingest/...) instead of deploy/trainer.yaml's one "
        "worker on a plain durable subscription",
    )
    args = ap.parse_args(argv)
    if args.workers > 1 and not args.shared:
        ap.error("--workers > 1 needs --shared: without a shared subscription each worker gets every message")
    from bench.accuracy_bench import cpu_flags

    result = run(args) | {"machine": {"cpu_flags": cpu_flags()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"soak-{args.workers}w-{'shared' if args.shared else 'plain'}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(format_table(result), flush=True)
    return 0 if result["windows_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
