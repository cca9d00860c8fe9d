"""``edgefleet ingest ...``: run ingest workers, inspect dead letters.

``edgefleet ingest run --broker mqtt://127.0.0.1:1883 --db sqlite:///fleet.db --fleet shop --workers 2``
starts one process per worker (index, index+1, ...) on the same shared subscription and restarts a
worker that dies, under the same index, so its persistent session (and the messages waiting in it)
is picked up again. SIGTERM or Ctrl-C stops them cleanly: buffered messages are committed and
acknowledged first. Also runnable as ``python -m trainer.ingest.cli run ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

log = logging.getLogger("trainer.ingest.worker")

RESTART_DELAY_S = 1.0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ingest`` group to the ``edgefleet`` command line."""
    p = sub.add_parser("ingest", help="MQTT ingest workers: telemetry and status into the store")
    isub = p.add_subparsers(dest="ingest_cmd", required=True)
    r = isub.add_parser("run", help="run ingest workers on the shared subscription until stopped")
    r.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    r.add_argument("--db", required=True, help="sqlite:///FILE or postgresql+psycopg://user@host/db")
    r.add_argument("--fleet", required=True)
    r.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    r.add_argument("--index", type=int, default=0, help="index of the first worker (stable client ids)")
    r.add_argument("--group", default="ingest", help="shared-subscription group")
    r.add_argument("--client-id", help="client id of a single worker (default {group}-{fleet}-{index})")
    r.add_argument("--kinds", default="tele,status,sample,update", help="message kinds to ingest")
    r.add_argument("--batch-max", type=int, default=200)
    r.add_argument("--batch-linger", type=float, default=0.0, help="seconds a batch waits for more messages")
    r.add_argument("--max-buffered", type=int, default=10_000)
    r.add_argument("--ca", type=Path)
    r.add_argument("--cert", type=Path)
    r.add_argument("--key", type=Path)
    r.add_argument("--stats-file", help="write counters as JSON here ({index} is replaced per worker)")
    r.add_argument("--stats-interval", type=float, default=10.0, help="seconds between stats reports")
    r.set_defaults(func=_run)
    d = isub.add_parser("dead-letters", help="list dead-lettered messages with their reasons")
    d.add_argument("--db", required=True)
    d.add_argument("--reason")
    d.set_defaults(func=_dead_letters)


def _config(args: argparse.Namespace) -> Any:
    from trainer.ingest.worker import IngestConfig

    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if args.client_id and args.workers > 1:
        raise SystemExit("--client-id names one worker; use --group/--index with --workers")
    return IngestConfig(
        broker_url=args.broker,
        db_url=args.db,
        fleet=args.fleet,
        group=args.group,
        index=args.index,
        client_id=args.client_id,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        batch_max=args.batch_max,
        batch_linger_s=args.batch_linger,
        max_buffered=args.max_buffered,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
    )


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    from trainer.store import Store

    Store(config.db_url).close()  # create the schema once, before workers race to do it
    if args.workers == 1:
        return run_worker(config, args.stats_file, args.stats_interval)
    return _supervise(
        [replace(config, index=config.index + i) for i in range(args.workers)],
        args.stats_file,
        args.stats_interval,
    )


def _write_stats(path: str | None, index: int, stats: dict[str, Any]) -> None:
    if not path:
        return
    target = Path(path.replace("{index}", str(index)))
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(stats, indent=1))
    os.replace(tmp, target)


def run_worker(config: Any, stats_file: str | None = None, stats_interval: float = 10.0) -> int:
    """Run one worker in this process until SIGTERM/SIGINT; report stats periodically."""
    from trainer.ingest.worker import IngestWorker

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


def _supervise(configs: list[Any], stats_file: str | None, stats_interval: float) -> int:
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


def _dead_letters(args: argparse.Namespace) -> int:
    from trainer.store import Store

    with Store(args.db, create=False) as store:
        for d in store.dead_letters(args.reason):
            print(f"{d.reason:14s} x{d.count:<5d} {d.payload_size:>8d} B  {d.topic}  {d.detail}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.ingest.cli run ...`` without the ``edgefleet`` entry point."""
    parser = argparse.ArgumentParser(prog="edgefleet")
    register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["ingest", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
