"""Ingest's hot path: the batched windows insert keeps exactly-once under duplicates, the writer limits
have one source, worker processes tune the garbage collector, and the faster histogram check refuses
what the old one refused."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from pydantic import ValidationError

from edge_agent.protocol import Histogram, TelemetryWindow
from trainer.cli.ingest import _config, register
from trainer.ingest.batching import WriterLimits
from trainer.ingest.processes import GC_GEN0_THRESHOLD
from trainer.ingest.worker import IngestConfig
from trainer.sim.windows import windows
from trainer.store import Store
from trainer.store.engine import bulk_insert
from trainer.store.ingest_writes import WINDOW_COLUMNS


def _row(w: TelemetryWindow) -> tuple[object, ...]:
    m = w.model
    return (
        w.fleet, w.device, w.session, w.seq, w.start, w.end, m.name, m.version, m.sha256, m.artifact,
        w.frames.inferred, w.frames.failed, w.confidence_mean, w.atc_above, False,
        w.model_dump_json(exclude_none=True), 1.0,
    )  # fmt: skip


def test_windows_insert_counts_duplicates_and_keeps_the_rest(db_url: str) -> None:
    """One batch holding a window twice and one already stored stores every other window, once, and
    reports only the new ones (COPY + INSERT .. SELECT .. ON CONFLICT on PostgreSQL, executemany on
    SQLite); a later batch in another transaction counts only its own rows (the staging table was
    emptied at commit)."""
    ws = windows("cam1", 8)
    key = ("device", "session", "seq")
    with Store(db_url) as store:
        with store.write() as conn:
            assert bulk_insert(conn, "windows", WINDOW_COLUMNS, key, [_row(ws[0])]) == 1
        batch = [_row(w) for w in (ws[1], ws[0], ws[2], ws[1], ws[3])]
        with store.write() as conn:
            assert bulk_insert(conn, "windows", WINDOW_COLUMNS, key, batch) == 3
        with store.write() as conn:
            assert bulk_insert(conn, "windows", WINDOW_COLUMNS, key, [_row(w) for w in ws[2:]]) == 4
        with store.write() as conn:
            assert bulk_insert(conn, "windows", WINDOW_COLUMNS, key, [_row(w) for w in ws]) == 0
        assert store.window_keys() == [("cam1", 1, i) for i in range(8)]
        assert store.windows(device="cam1")[5] == ws[5]  # the payload column round-trips


def test_writer_limits_have_one_source() -> None:
    """IngestConfig holds a WriterLimits; the CLI's defaults are its defaults and its options land in it."""
    assert IngestConfig(mqtt=None, db_url="sqlite://", fleet="f").limits == WriterLimits()  # type: ignore[arg-type]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="group"))
    base = ["ingest", "run", "--broker", "mqtt://127.0.0.1:1883", "--db", "sqlite://", "--fleet", "f"]
    assert _config(parser.parse_args(base)).limits == WriterLimits()
    args = parser.parse_args([*base, "--batch-max", "50", "--batch-linger", "0.1", "--max-buffered", "99"])
    assert _config(args).limits == WriterLimits(batch_max=50, batch_linger_s=0.1, max_buffered=99)


def test_worker_processes_freeze_the_import_heap_and_collect_less_often() -> None:
    """run_worker's GC settings: what the imports made is frozen, young collections are rarer."""
    code = (
        "import gc, trainer.ingest.worker; from trainer.ingest.processes import tune_gc; "
        "before = gc.get_threshold(); tune_gc(); "
        "print(gc.get_freeze_count(), gc.get_threshold()[0], before[1:] == gc.get_threshold()[1:])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    frozen, gen0, kept = out.split()
    assert int(frozen) > 10_000 and int(gen0) == GC_GEN0_THRESHOLD and kept == "True"


@pytest.mark.parametrize(
    ("edges", "counts", "problem"),
    [
        ([0.0, 0.5, 1.0], [1, 2], None),
        ([0.0, 0.5, 0.5, 1.0], [1, 2, 3], "edges must increase strictly"),
        ([0.0, 0.7, 0.5, 1.0], [1, 2, 3], "edges must increase strictly"),
        ([1.0, 0.0], [1], "edges must increase strictly"),
        ([0.0, 0.5, 1.0], [1, 2, 3], "3 counts for 3 edges"),
        ([0.0, 0.5, 1.0], [1], "1 counts for 3 edges"),
    ],
)
def test_histogram_edges_and_counts(edges: list[float], counts: list[int], problem: str | None) -> None:
    payload = Histogram.model_construct(edges=edges, counts=counts).model_dump_json()
    if problem is None:
        assert Histogram.model_validate_json(payload).edges == edges
    else:
        with pytest.raises(ValidationError, match=problem):
            Histogram.model_validate_json(payload)
