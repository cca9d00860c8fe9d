"""``edgefleet trainer webhooks``: the alert deliveries to the webhooks of a trainer.yaml, newest first
(what was delivered, what is pending and when it is tried next, what failed and why)."""

from __future__ import annotations

import argparse
import json
import sys

from trainer.store.webhook_queue import STATES


def add_webhooks_command(tsub: argparse._SubParsersAction) -> None:
    """Register ``trainer webhooks`` on the ``trainer`` group's subcommands."""
    w = tsub.add_parser(
        "webhooks",
        help="alert deliveries to the configured webhooks: pending, delivered, failed (one JSON line each)",
        description="List the alert deliveries in the service's store, newest first, one JSON line each: "
        "webhook, URL (scheme, host and port only), alert, state, attempts, next attempt, last error.",
    )
    w.add_argument("--config", required=True, help="the trainer YAML (its store and webhooks: section)")
    w.add_argument("--state", choices=STATES, help="only deliveries in this state")
    w.add_argument("--webhook", help="only this webhook's deliveries (its name in the config)")
    w.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    w.set_defaults(func=_webhooks)


def _webhooks(args: argparse.Namespace) -> int:
    from edge_agent.errors import ConfigError
    from trainer.fleet.config import load_service_config
    from trainer.store import Store
    from trainer.store.webhook_queue import delivery_page

    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1 (got {args.limit})")
    cfg = load_service_config(args.config)
    urls = {h.name: h.shown_url for h in cfg.webhooks}
    if args.webhook and args.webhook not in urls:
        known = ", ".join(sorted(urls)) or "none"
        print(
            f"note: {args.config} configures no webhook {args.webhook!r} (it has: {known})", file=sys.stderr
        )
    with Store(cfg.db_url, create=False) as store:
        page = delivery_page(
            store,
            states=None if args.state is None else [args.state],
            webhook=args.webhook,
            limit=args.limit,
        )
    for row in page.items:
        print(json.dumps({**vars(row), "url": urls.get(row.webhook)}))
    if page.total > len(page.items):
        print(f"{len(page.items)} of {page.total} deliveries shown (--limit)", file=sys.stderr)
    return 0
