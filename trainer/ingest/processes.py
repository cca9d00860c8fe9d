"""Ingest worker processes: one worker run until a signal, and a supervisor that restarts dead workers.

A restarted worker keeps its index, so its persistent session (and the messages waiting in it) is
picked up again.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.files import write_atomic

log = logging.getLogger(__name__)
RESTART_DELAY_S = 1.0


def _write_stats(path: str | None, index: int, stats: dict[str, Any]) -> None:
    if not path:
        return
    write_atomic(Path(path.replace("{index}", str(index))), json.dumps(stats, indent=1))


GC_GEN0_THRESHOLD = 50_000
"""Allocations between young collections in a worker process (CPython's default is 700)."""


def tune_gc() -> None:
    """Keep the cyclic garbage collector from eating a worker process's CPU (call after the imports).

    Validating a window allocates hundreds of containers and the buffer holds thousands of messages,
    so with CPython's defaults the survivors of young collections trigger a full collection every
    ~1,000 windows, and each walks the whole heap (SQLAlchemy, pydantic, the protocol models):
    about 125-150 us per 3.5 KB window in bench/ingest_breakdown.py's measurement, more than the
    validation itself. Freezing what the imports made takes it out of every collection, and a higher
    young threshold makes them rarer; garbage without cycles (nearly all of it) is freed at once by
    reference counting either way.
    """
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, g1, g2)


def run_worker(config: Any, stats_file: str | None = None, stats_interval: float = 10.0) -> int:
    """Run one worker in this process until SIGTERM/SIGINT; report stats periodically."""
    from trainer.ingest.worker import IngestWorker

    tune_gc()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = IngestWorker(config).start()
    interval = min(stats_interval, 1.0) if stats_file else stats_interval
    last_log = time.monotonic()
    ident = {"pid": os.getpid(), "client_id": worker.client_id}
    while not stop.wait(interval) and worker.failed is None:
        stats = worker.stats()
        _write_stats(stats_file, config.index, {**ident, **stats, "process_cpu_s": time.process_time()})
        if time.monotonic() - last_log >= stats_interval:
            last_log = time.monotonic()
            log.info("ingest %s: %s", worker.client_id, json.dumps({k: v for k, v in stats.items() if v}))
    final = worker.stop()
    _write_stats(
        stats_file, config.index, {**ident, **final, "process_cpu_s": time.process_time(), "stopped": True}
    )
    log.info("ingest %s stopped: %s", worker.client_id, json.dumps(final))
    return 1 if worker.failed is not None else 0


def _child(config: Any, stats_file: str | None, stats_interval: float, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sys.exit(run_worker(config, stats_file, stats_interval))


def supervise(configs: list[Any], stats_file: str | None, stats_interval: float) -> int:
    """One process per worker; a worker that dies is restarted under the same index."""
    ctx = mp.get_context("spawn")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)

    def spawn(cfg: Any) -> Any:
        p = ctx.Process(
            target=_child, args=(cfg, stats_file, stats_interval, verbose), name=f"ingest-{cfg.index}"
        )
        p.start()
        return p

    procs = {cfg.index: (cfg, spawn(cfg)) for cfg in configs}
    while not stop.wait(0.5):
        for index, (cfg, p) in list(procs.items()):
            if not p.is_alive():
                log.warning(
                    "ingest worker %d exited with %s; restarting in %.0f s",
                    index,
                    p.exitcode,
                    RESTART_DELAY_S,
                )
                time.sleep(RESTART_DELAY_S)
                procs[index] = (cfg, spawn(cfg))
    for _, p in procs.values():
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGTERM)
    failed = 0
    for _, p in procs.values():
        p.join(60)
        failed += p.exitcode not in (0, None)
    return 1 if failed else 0
