"""``edgefleet ingest ...``: run ingest workers, inspect dead letters.

``edgefleet ingest run --broker mqtt://127.0.0.1:1883 --db sqlite:///fleet.db --fleet shop --workers 2``
starts one process per worker (index, index+1, ...) on the same shared subscription and restarts a
worker that dies, under the same index, so its persistent session (and the messages waiting in it)
is picked up again. SIGTERM or Ctrl-C stops them cleanly: buffered messages are committed and
acknowledged first. Also runnable as ``python -m trainer.cli.ingest run ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from trainer.ingest.batching import WriterLimits
from trainer.ingest.processes import run_worker, supervise


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
    r.add_argument(
        "--no-shared",
        action="store_true",
        help="a plain durable subscription (one worker): mosquitto before 2.0.12 does not restore shared "
        "subscriptions after a restart, so windows sent before the workers reconnect would be lost",
    )
    r.add_argument(
        "--client-prefix",
        default="trainer",
        help="the identity the workers connect as (the certificate's name; deploy/mosquitto's guard accepts "
        "a service's client ids only as NAME or NAME-...): client ids are {prefix}-{group}-{fleet}-{index}",
    )
    r.add_argument(
        "--client-id", help="client id of a single worker (default {client-prefix}-{group}-{fleet}-{index})"
    )
    r.add_argument("--kinds", default="tele,status,sample,update", help="message kinds to ingest")
    _limit_options(r)
    r.add_argument("--username", help="broker user name (the password is read from EDGEFLEET_MQTT_PASSWORD)")
    r.add_argument("--ca", type=Path)
    r.add_argument("--cert", type=Path)
    r.add_argument("--key", type=Path)
    r.add_argument(
        "--nats",
        action="append",
        metavar="URL",
        help="the NATS broker tier (deploy/nats): read the JetStream consumer on these nodes' client listeners "
        "(repeat for each node, e.g. tls://nats-1:4222) instead of the MQTT shared subscription; TLS files as "
        "--ca/--cert/--key. The consumer is created if missing",
    )
    r.add_argument(
        "--nats-consumer", default="ingest", help="the durable JetStream consumer the workers share"
    )
    r.add_argument("--stats-file", help="write counters as JSON here ({index} is replaced per worker)")
    r.add_argument("--stats-interval", type=float, default=10.0, help="seconds between stats reports")
    r.set_defaults(func=_run)
    d = isub.add_parser("dead-letters", help="list dead-lettered messages with their reasons")
    d.add_argument("--db", required=True)
    d.add_argument("--reason")
    d.set_defaults(func=_dead_letters)


def _limit_options(r: argparse.ArgumentParser) -> None:
    """The writer's batching options, defaulting to :class:`WriterLimits` (their one source)."""
    limits = WriterLimits()
    r.add_argument("--batch-max", type=int, default=limits.batch_max, help="most messages per transaction")
    r.add_argument(
        "--batch-linger",
        type=float,
        default=limits.batch_linger_s,
        help="seconds a batch waits for more messages",
    )
    r.add_argument(
        "--max-buffered",
        type=int,
        default=limits.max_buffered,
        help="messages buffered before reading pauses",
    )


def _config(args: argparse.Namespace) -> Any:
    from edge_agent.config import MqttSettings
    from trainer.ingest.worker import IngestConfig

    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if args.client_id and args.workers > 1:
        raise SystemExit("--client-id names one worker; use --group/--index with --workers")
    if args.no_shared and args.workers > 1:
        raise SystemExit(
            "--no-shared is one worker: without a shared subscription each would get every message"
        )
    nats = None
    if args.nats:
        from trainer.ingest.nats_source import NatsSettings

        nats = NatsSettings(servers=args.nats, consumer=args.nats_consumer)
    return IngestConfig(
        nats=nats,
        mqtt=MqttSettings(
            url=args.broker,
            username=args.username,
            password=os.environ.get("EDGEFLEET_MQTT_PASSWORD"),
            ca=args.ca,
            cert=args.cert,
            key=args.key,
        ),
        db_url=args.db,
        fleet=args.fleet,
        group=args.group,
        shared=not args.no_shared,
        index=args.index,
        client_prefix=args.client_prefix,
        client_id=args.client_id,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        limits=replace(
            WriterLimits(),
            batch_max=args.batch_max,
            batch_linger_s=args.batch_linger,
            max_buffered=args.max_buffered,
        ),
    )


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    from trainer.store import Store

    Store(config.db_url).close()  # create the schema once, before workers race to do it
    if config.nats is not None:  # before any worker: JetStream keeps messages only for an existing consumer
        from trainer.ingest.nats_source import ensure_ingest_consumer

        ensure_ingest_consumer(config.nats, config.mqtt, config.fleet)
    if args.workers == 1:
        return run_worker(config, args.stats_file, args.stats_interval)
    return supervise(
        [replace(config, index=config.index + i) for i in range(args.workers)],
        args.stats_file,
        args.stats_interval,
    )


def _dead_letters(args: argparse.Namespace) -> int:
    from trainer.store import Store

    with Store(args.db, create=False) as store:
        for d in store.dead_letters(args.reason):
            print(f"{d.reason:14s} x{d.count:<5d} {d.payload_size:>8d} B  {d.topic}  {d.detail}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.cli.ingest run ...`` without the ``edgefleet`` entry point."""
    parser = argparse.ArgumentParser(prog="edgefleet")
    register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["ingest", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
