"""CLI groups of the fleet loop: ``trainer serve | forget-device``, ``labels`` and ``rollout``."""

from __future__ import annotations

import argparse
import getpass
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError
from trainer.cli.release import add_hint_broker
from trainer.cli.webhooks import add_webhooks_command


def register_trainer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trainer", help="the trainer service (ingest, drift, retraining, rollout, releases)")
    tsub = p.add_subparsers(dest="trainer_cmd", required=True)
    add_webhooks_command(tsub)
    s = tsub.add_parser("serve", help="run the service until SIGTERM")
    s.add_argument("--config", required=True, help="trainer YAML (see deploy/trainer.yaml)")
    s.add_argument(
        "--champion",
        help="the model package the fleet runs now (released to every device if it "
        "is not the stable release yet)",
    )
    s.set_defaults(func=_serve)
    f = tsub.add_parser(
        "forget-device",
        help="remove a device from its fleet: the console's fleet page, the metrics and Home Assistant",
        description="Remove DEVICE from FLEET (a camera taken down for good): it leaves the console's fleet "
        "page and the metrics, and the running service clears its Home Assistant entities. Its history "
        "stays; a message it sends after this brings it back.",
    )
    f.add_argument("--config", required=True, help="the trainer YAML of the fleet's service")
    f.add_argument("fleet", help="the fleet (must be the config's: a check against the wrong file)")
    f.add_argument("device")
    f.add_argument("--reason", help="why (kept in the audit log)")
    f.set_defaults(func=_forget_device)


def _serve(args: argparse.Namespace) -> int:
    from trainer.fleet.config import load_service_config
    from trainer.fleet.service import TrainerService

    cfg = load_service_config(args.config)
    labeller = None
    if cfg.labeller == "oracle":
        from trainer.sim.fleet import oracle_label

        labeller = oracle_label
    done = threading.Event()  # before anything starts: a SIGTERM while starting stops cleanly
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    service = TrainerService(cfg, labeller=labeller).start(announce_ready=False)
    if args.champion:
        from edge_agent.package import load_package

        service.adopt_champion(load_package(args.champion))
    console = None
    if cfg.console is not None:
        from trainer.console.server import ConsoleServer, context_for

        ctx = context_for(cfg, service.store, cfg.console, metrics=service.metrics_registry)
        console = ConsoleServer(ctx, cfg.console).start()
        print(f"console at {console.url}", flush=True)
    service.announce_ready()  # systemd: READY=1 once the console listens too
    done.wait()
    if console is not None:
        console.stop()
    service.stop()
    return 0


def _forget_device(args: argparse.Namespace) -> int:
    from trainer.fleet.config import load_service_config
    from trainer.store import Store
    from trainer.store.fleet_state import forget_device

    cfg = load_service_config(args.config)
    if args.fleet != cfg.fleet:
        raise ConfigError(f"{args.config} is the trainer of fleet {cfg.fleet!r}, not {args.fleet!r}")
    with Store(cfg.db_url, create=False) as store:
        row = forget_device(store, cfg.fleet, args.device, actor=getpass.getuser(), reason=args.reason)
    seen = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.last_seen))
    ha = "; the running service clears its Home Assistant entities" if cfg.homeassistant else ""
    print(f"removed {row.device} from fleet {cfg.fleet} (last heard from {seen}){ha}")
    return 0


def register_labels(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labels", help="the labelling queue of sample frames")
    lsub = p.add_subparsers(dest="labels_cmd", required=True)
    e = lsub.add_parser("export", help="write unlabelled samples to a CSV (images beside it)")
    e.add_argument("--db", required=True, help="the trainer's database URL")
    e.add_argument("--package", required=True, help="the model package whose labels apply")
    e.add_argument("--out", required=True)
    e.add_argument("--limit", type=int)
    e.set_defaults(func=_export)
    i = lsub.add_parser("import", help="store the labels filled in a queue CSV")
    i.add_argument("csv")
    i.add_argument("--db", required=True)
    i.add_argument("--package", required=True)
    i.add_argument("--labeller", default=None, help="who labelled (default: the current user)")
    i.set_defaults(func=_import)


def _labels_of(package: str) -> list[str]:
    from edge_agent.package import load_package

    return list(load_package(package).manifest.labels)


def _export(args: argparse.Namespace) -> int:
    from trainer.fleet.labelling import export_queue
    from trainer.store import Store

    with Store(args.db, create=False) as store:
        n = export_queue(store, Path(args.out), _labels_of(args.package), args.limit)
    print(
        f"wrote {n} unlabelled samples to {args.out}; fill in the label column, then `edgefleet labels import`"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from trainer.fleet.labelling import import_labels
    from trainer.store import Store

    with Store(args.db, create=False) as store:
        n = import_labels(store, Path(args.csv), _labels_of(args.package), args.labeller or getpass.getuser())
    print(f"stored {n} new labels")
    return 0


def register_rollout(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="staged rollouts: status, promote, abort")
    rsub = p.add_subparsers(dest="rollout_cmd", required=True)
    for name, helptext in (
        ("status", "rollouts and their state"),
        ("promote", "promote the running canary to stable"),
        ("abort", "roll the canary cohort back onto the champion"),
    ):
        r = rsub.add_parser(name, help=helptext)
        r.add_argument("--db", required=True)
        r.add_argument("--repo", required=True)
        r.add_argument("--fleet", required=True)
        r.add_argument("--model", help="the model (default: the only one released in this fleet)")
        if name != "status":
            r.add_argument("--reason", required=True)
            add_hint_broker(r, with_url=False)
        r.set_defaults(func=_rollout, rollout_action=name)


def _rollout_model(repo: Any, fleet: str, model: str | None) -> str:
    """``model``, or the only model released in ``fleet`` (ConfigError naming the choices otherwise)."""
    if model:
        return model
    models = sorted({r.model for r in repo.releases() if r.fleet == fleet})
    if len(models) != 1:
        raise ConfigError(
            f"fleet {fleet!r} has {'no releases' if not models else 'models ' + ', '.join(models)}: pass --model"
        )
    return models[0]


def _print_rollouts(rollouts: list[Any]) -> None:
    """One JSON line per rollout."""
    for r in rollouts:
        fields = ("id", "release_id", "cohort", "state", "started_at", "updated_at")
        print(json.dumps({f: getattr(r, f) for f in fields}))


def _rollout(args: argparse.Namespace) -> int:
    from trainer.errors import RolloutDecided
    from trainer.fleet.rollout import decide_by_hand
    from trainer.release.repository import ReleaseRepository
    from trainer.store import Store

    repo = ReleaseRepository(args.repo)
    with Store(args.db, create=False) as store:
        if args.rollout_action == "status":
            _print_rollouts(store.rollouts(args.fleet))
            return 0
        model = _rollout_model(repo, args.fleet, args.model)
        publisher = None
        if args.broker:  # connected before deciding: a broker it cannot reach changes nothing
            from trainer.release.hints import HintSender, mqtt_settings

            publisher = HintSender(mqtt_settings(args.broker, args.ca, args.cert, args.key))
        try:
            out = decide_by_hand(
                store,
                repo,
                publisher,
                fleet=args.fleet,
                model=model,
                action="promote" if args.rollout_action == "promote" else "abort",
                reason=args.reason,
                actor=getpass.getuser(),
            )
        except RolloutDecided as exc:
            print(exc)
            return 1
        finally:
            if publisher:
                publisher.close()
        print(f"{out.decision}: release {out.release.release} on {out.release.channel}")
    return 0
