"""The containers' HEALTHCHECK: is the agent's frame loop still closing windows, does a service answer?

Docker runs it inside the container every interval; exit 0 is healthy, 1 unhealthy, and the one line it
prints is what ``docker inspect`` shows. Two checks (deploy/containers/README.md):

    healthcheck.py agent --config /etc/edgefleet/agent.yaml
        The agent rewrites its metrics textfile (``metrics.textfile`` in agent.yaml) after every telemetry
        window, from its main loop, whether or not the broker is reachable (windows are spooled then).
        A file older than 3 windows means the loop is stuck: the same thing systemd's watchdog watches.
    healthcheck.py http URL [--expect REGEX]
        The URL answers 200 within the timeout (and its body matches REGEX): the console's /healthz,
        the trainer service's /metrics with ``edgefleet_store_up ... 1`` (its database answers).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

WINDOWS_ALLOWED = 3.0
"""A textfile older than this many windows means the agent stopped closing them."""

FRAMES_ONLY_MAX_AGE_S = 300.0
"""The limit when windows close by frame count only (``window_seconds: null``): no time bounds them."""


def agent_max_age(window_seconds: float | None) -> float:
    """How old the textfile may be: 3 windows (at least 30 s), or EDGEFLEET_HEALTH_MAX_AGE_S if set."""
    override = os.environ.get("EDGEFLEET_HEALTH_MAX_AGE_S")
    if override:
        return float(override)
    if window_seconds is None:
        return FRAMES_ONLY_MAX_AGE_S
    return max(WINDOWS_ALLOWED * window_seconds, 30.0)


def check_agent(config: Path, now: float) -> tuple[bool, str]:
    """Whether the agent configured by ``config`` wrote its metrics textfile recently, and why not."""
    from edge_agent.config import load_config  # the agent's own parser: ${ENV}, relative paths

    cfg = load_config(config)
    if cfg.metrics is None or cfg.metrics.textfile is None:
        return False, (
            f"{config}: no metrics.textfile: the healthcheck reads it "
            "(metrics: {textfile: /var/lib/edgefleet/agent.prom})"
        )
    textfile = cfg.metrics.textfile
    try:
        age = now - textfile.stat().st_mtime
    except FileNotFoundError:
        return False, f"{textfile}: no telemetry window written yet"
    limit = agent_max_age(cfg.telemetry.window_seconds)
    if age > limit:
        return (
            False,
            f"{textfile}: last window {age:.0f} s ago (limit {limit:.0f} s): the frame loop is stuck",
        )
    return True, f"last window {age:.0f} s ago"


def check_http(url: str, expect: str | None, timeout: float) -> tuple[bool, str]:
    """Whether ``url`` answers 200 within ``timeout`` s with a body matching ``expect`` (multiline)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - a URL we configured
            body = resp.read().decode("utf-8", "replace")
            status = resp.status
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"
    if status != 200:
        return False, f"{url}: HTTP {status}"
    if expect is not None and not re.search(expect, body, re.MULTILINE):
        return False, f"{url}: answered, but nothing matches {expect!r}"
    return True, f"{url}: ok"


def parser() -> argparse.ArgumentParser:
    """The command line: ``agent --config FILE`` or ``http URL [--expect REGEX] [--timeout S]``."""
    p = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="check", required=True)
    a = sub.add_parser("agent", help="the agent's metrics textfile is younger than 3 windows")
    a.add_argument("--config", type=Path, required=True, help="the agent's YAML config")
    h = sub.add_parser("http", help="a URL answers 200 (and its body matches --expect)")
    h.add_argument("url")
    h.add_argument("--expect", help="a regular expression the body must match (multiline)")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one check; print its one-line verdict; 0 healthy, 1 not."""
    args = parser().parse_args(argv)
    try:
        if args.check == "agent":
            ok, why = check_agent(args.config, time.time())
        else:
            ok, why = check_http(args.url, args.expect, args.timeout)
    except Exception as exc:  # noqa: BLE001 - a broken config is "unhealthy", said in one line
        ok, why = False, f"{type(exc).__name__}: {exc}"
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
