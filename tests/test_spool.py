"""The durable spool: FIFO order, bounds and eviction, restarts, full disks, corrupt files, two threads."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from edge_agent.events import EventCounter
from edge_agent.spool import Spool


def _payloads(spool: Spool, limit: int = 10_000) -> list[bytes]:
    return [item.payload for item in spool.peek(limit)]


def test_fifo_order_fields_and_ack(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.sqlite", max_messages=100, max_bytes=1 << 20) as spool:
        for i in range(5):
            spool.put(f"t/{i}", f"m{i}".encode(), qos=i % 2, retain=i == 3)
        items = spool.peek(10)
        assert [i.topic for i in items] == [f"t/{i}" for i in range(5)]
        assert [i.payload for i in items] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
        assert [i.qos for i in items] == [0, 1, 0, 1, 0]
        assert [i.retain for i in items] == [False, False, False, True, False]
        assert items == sorted(items, key=lambda i: i.id) and items[0].id > 0
        assert [i.payload for i in spool.peek(2)] == [b"m0", b"m1"]
        assert [i.payload for i in spool.peek(10, after_id=items[1].id)] == [b"m2", b"m3", b"m4"]

        spool.ack(items[2].id)
        spool.ack(items[2].id)  # acking twice (a duplicate PUBACK) is harmless
        spool.ack(999_999)
        assert _payloads(spool) == [b"m0", b"m1", b"m3", b"m4"]
        assert len(spool) == 4 and spool.size_bytes() == 8
        spool.ack_many([items[0].id, items[4].id])
        assert _payloads(spool) == [b"m1", b"m3"]


def test_count_bound_evicts_oldest_first_and_counts(tmp_path: Path, caplog) -> None:
    events = EventCounter()
    with Spool(tmp_path / "s.sqlite", max_messages=3, max_bytes=1 << 20, events=events) as spool:
        for i in range(5):
            spool.put("t", f"m{i}".encode())
        assert _payloads(spool) == [b"m2", b"m3", b"m4"]
        assert spool.evicted == 2
        assert len(spool) == 3
        assert spool.take_evictions() == 2
        assert spool.take_evictions() == 0  # reported once
    assert "evicted the 1 oldest message" in caplog.text and str(tmp_path / "s.sqlite") in caplog.text


def test_byte_bound_evicts_oldest_first(tmp_path: Path) -> None:
    events = EventCounter()
    with Spool(tmp_path / "s.sqlite", max_messages=100, max_bytes=1000, events=events) as spool:
        for i in range(3):
            spool.put("t", bytes([i]) * 400)
        assert [p[0] for p in _payloads(spool)] == [1, 2]
        assert spool.size_bytes() == 800 and spool.evicted == 1
        spool.put("t", b"\x09" * 900)  # needs both older messages gone
        assert [p[0] for p in _payloads(spool)] == [9]
        assert spool.evicted == 3
        spool.put("t", b"x" * 1500)  # larger than the whole spool: nothing can keep it
        assert len(spool) == 0 and spool.size_bytes() == 0
        assert spool.take_evictions() == 5


def test_eviction_reports_add_up_even_when_the_reporting_windows_are_evicted(tmp_path: Path) -> None:
    """Each window reports the evictions since the previous one; when it is evicted in turn, its report
    went with it (4 reported for 9 evicted). What a message carries is reported again."""
    with Spool(tmp_path / "s.sqlite", max_messages=3, max_bytes=1 << 20) as spool:
        for i in range(12):  # the agent: take the count, put it in the next window
            n = spool.take_evictions()
            spool.put("tele", f"window {i} reports {n}".encode(), carries=n)
        delivered = sum(int(p.split()[-1]) for p in _payloads(spool))  # the broker gets these three
        assert delivered + spool.take_evictions() == spool.evicted == 9


def test_an_older_spool_file_gains_the_carries_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, created REAL NOT NULL)"
        )
        conn.execute(
            "INSERT INTO spool (topic, payload, qos, retain, created) VALUES ('t', x'01', 1, 0, 1.0)"
        )
    with Spool(path, max_messages=1, max_bytes=1 << 20) as spool:
        spool.put("t", b"new", carries=2)
        assert _payloads(spool) == [b"new"] and spool.take_evictions() == 1


def test_unreported_evictions_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with Spool(path, max_messages=2, max_bytes=1 << 20) as spool:
        for i in range(6):
            spool.put("t", f"m{i}".encode())
    with Spool(path, max_messages=2, max_bytes=1 << 20) as again:
        assert again.take_evictions() == 4  # the agent reports them in its first window after restart
        assert again.take_evictions() == 0


def test_reopen_sees_undelivered_rows(tmp_path: Path) -> None:
    path = tmp_path / "state" / "spool.sqlite"  # the directory is created
    with Spool(path, max_messages=100, max_bytes=1 << 20) as spool:
        for i in range(10):
            spool.put("t", f"m{i}".encode(), retain=i == 0)
        first = spool.peek(10)
        spool.ack_many(i.id for i in first[:4])
    with Spool(path, max_messages=100, max_bytes=1 << 20) as again:
        assert again.peek(10) == first[4:]
        assert len(again) == 6 and again.size_bytes() == 12
        again.put("t", b"new")
        assert again.peek(10)[-1].id > first[-1].id  # ids are never reused


def test_rows_survive_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    child = textwrap.dedent(
        f"""
        import sys, time
        from edge_agent.spool import Spool
        spool = Spool({str(path)!r}, max_messages=1000, max_bytes=1 << 20)
        for i in range(50):
            spool.put("t", b"m%d" % i)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    with Spool(path, max_messages=1000, max_bytes=1 << 20) as spool:
        assert _payloads(spool) == [b"m%d" % i for i in range(50)]


def test_full_disk_keeps_messages_in_memory_until_space_returns(tmp_path: Path, caplog) -> None:
    events = EventCounter()
    path = tmp_path / "spool.sqlite"
    # max_pages makes SQLite answer "database or disk is full" after a few 4 KiB pages.
    spool = Spool(path, max_messages=1000, max_bytes=1 << 30, events=events, max_pages=12)
    sent = [bytes([i]) * 3000 for i in range(30)]
    with caplog.at_level(logging.ERROR):
        for p in sent:
            spool.put("t/full", p)
    assert events.totals().get("spool_disk_errors", 0) >= 1
    assert "spool_evicted" not in events.totals()
    assert f"spool {path}: write failed (database or disk is full)" in caplog.text

    items = spool.peek(100)
    assert [i.payload for i in items] == sent  # nothing lost, still oldest first
    on_disk = [i for i in items if i.id > 0]
    in_memory = [i for i in items if i.id < 0]
    assert on_disk and in_memory and items == on_disk + in_memory
    assert len(spool) == 30 and spool.size_bytes() == 30 * 3000
    # Overflow entries are delivered and acked like rows.
    spool.ack(in_memory[-1].id)
    sent.pop()

    # Delivering (acking) disk rows frees pages; the next put moves the overflow to disk in order.
    delivered = 0
    while any(i.id < 0 for i in spool.peek(100)):
        spool.ack(spool.peek(1)[0].id)
        delivered += 1
        spool.put("t/full", b"tick")
        sent.append(b"tick")
        assert delivered < 30, "the overflow never moved to disk"
    spool.close()
    with Spool(path, max_messages=1000, max_bytes=1 << 30, max_pages=1000) as reopened:
        assert _payloads(reopened) == sent[delivered:]


def test_overflow_is_bounded_and_drops_oldest(tmp_path: Path) -> None:
    events = EventCounter()
    spool = Spool(tmp_path / "s.sqlite", 1000, 1 << 30, events=events, overflow_messages=5, max_pages=8)
    for i in range(40):
        spool.put("t", bytes([i]) * 3000)
    items = spool.peek(100)
    disk = [i.payload[0] for i in items if i.id > 0]
    memory = [i.payload[0] for i in items if i.id < 0]
    assert memory == list(range(35, 40))  # the newest five
    assert spool.evicted == 40 - len(disk) - 5
    assert spool.take_evictions() == spool.evicted
    assert events.totals()["spool_disk_errors"] == 40 - len(disk)
    spool.close()


def test_corrupt_file_is_moved_aside(tmp_path: Path, caplog) -> None:
    path = tmp_path / "spool.sqlite"
    garbage = b"this is not a database\n" * 200
    path.write_bytes(garbage)
    events = EventCounter()
    with caplog.at_level(logging.ERROR), Spool(path, 100, 1 << 20, events=events) as spool:
        spool.put("t", b"after")
        assert _payloads(spool) == [b"after"]
    aside = list(tmp_path.glob("spool.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    assert events.totals()["spool_corrupt"] == 1
    assert str(aside[0]) in caplog.text and "is corrupt" in caplog.text
    with Spool(path, 100, 1 << 20) as again:  # the fresh spool is a real database
        assert _payloads(again) == [b"after"]


def test_unusable_path_keeps_working_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    events = EventCounter()
    spool = Spool(blocker / "spool.sqlite", 100, 1 << 20, events=events)
    spool.put("t", b"a")
    spool.put("t", b"b")
    items = spool.peek(10)
    assert [i.payload for i in items] == [b"a", b"b"] and all(i.id < 0 for i in items)
    spool.ack(items[0].id)
    assert _payloads(spool) == [b"b"]
    assert events.totals()["spool_disk_errors"] >= 2
    spool.close()
    assert spool.evicted == 1  # closing cannot write it anywhere: counted, not silent


def test_two_threads_put_and_ack(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", 10_000, 1 << 24)
    n = 400
    received: list[bytes] = []

    def produce() -> None:
        for i in range(n):
            spool.put("t", b"%d" % i)

    producer = threading.Thread(target=produce)
    producer.start()
    cursor = 0
    while len(received) < n:
        batch = spool.peek(20, after_id=cursor)
        for item in batch:
            received.append(item.payload)
            cursor = item.id
        spool.ack_many(i.id for i in batch)
        if not batch:
            producer.join(0.001)
    producer.join()
    assert received == [b"%d" % i for i in range(n)]
    assert len(spool) == 0
    spool.close()
