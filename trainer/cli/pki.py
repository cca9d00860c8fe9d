"""``edgefleet pki ...``: the fleet's CA and certificates for mutual TLS (see deploy/README.md).

    edgefleet pki init --dir pki --broker-host broker.example.com     # CA + the broker's server certificate
    edgefleet pki issue-device cam-01 --dir pki                       # pki/device/cam-01.{crt,key}
    edgefleet pki issue-service trainer --dir pki                     # pki/service/trainer.{crt,key}

The certificate's common name becomes the MQTT username (``use_identity_as_username``) that the broker
ACL keys on, so a device id or service name is both an identity and a permission boundary.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from edge_agent.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def register_pki(sub: argparse._SubParsersAction) -> None:
    """Add the ``pki`` group."""
    p = sub.add_parser("pki", help="CA and certificates for mutual TLS with the broker")
    ps = p.add_subparsers(dest="pki_cmd", required=True)
    i = ps.add_parser("init", help="create a CA and the broker's server certificate")
    i.add_argument("--dir", default="pki")
    i.add_argument(
        "--broker-host", action="append", default=[], help="DNS name or IP of the broker (repeatable)"
    )
    i.add_argument("--days", type=int, default=3650)
    i.set_defaults(func=_init)
    d = ps.add_parser("issue-device", help="a client certificate whose CN is the device id")
    d.add_argument("id")
    d.add_argument("--dir", default="pki")
    d.add_argument("--days", type=int, default=825)
    d.add_argument("--force", action="store_true", help="replace an existing certificate and key")
    d.set_defaults(func=_issue, kind="device")
    s = ps.add_parser("issue-service", help="a client certificate for a service (trainer, monitor)")
    s.add_argument("id", metavar="NAME")
    s.add_argument("--dir", default="pki")
    s.add_argument("--days", type=int, default=825)
    s.add_argument("--force", action="store_true", help="replace an existing certificate and key")
    s.set_defaults(func=_issue, kind="service")


def _init(args: argparse.Namespace) -> int:
    from trainer.ops import pki

    try:
        files = pki.init_ca(args.dir, days=args.days)
    except FileExistsError as exc:
        raise ConfigError(str(exc)) from None
    hosts = tuple(args.broker_host) or ("localhost", "127.0.0.1")
    server = pki.issue(args.dir, "broker", kind="server", hosts=hosts)
    print(f"CA: {files.cert} (key {files.key}, mode 0600: keep it offline)")
    print(f"broker: {server.cert} {server.key} for {', '.join(hosts)}")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from trainer.ops import pki

    if not _NAME.match(args.id):
        raise ConfigError(
            f"{args.id!r}: names are letters, digits, '_', '.', '-' (at most 64; no MQTT wildcards)"
        )
    other = "service" if args.kind == "device" else "device"
    if (Path(args.dir) / other / f"{args.id}.crt").exists():
        raise ConfigError(
            f"{args.id!r} is already a {other} identity; a name is one identity and one ACL user"
        )
    if not (Path(args.dir) / pki.CA_KEY).exists():
        raise ConfigError(f"{args.dir}: no CA here (run `edgefleet pki init --dir {args.dir}` first)")
    try:
        files = pki.issue(args.dir, args.id, kind=args.kind, days=args.days, force=args.force)
    except (ValueError, FileExistsError) as exc:
        raise ConfigError(str(exc)) from None
    print(f"{args.kind} {args.id}: {files.cert} {files.key} (CA {files.ca})")
    if args.kind == "device":
        print(
            f"agent config: mqtt: {{url: 'mqtts://BROKER:8883', ca: {files.ca}, cert: {files.cert}, key: {files.key}}}"
        )
    return 0
