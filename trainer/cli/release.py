"""``edgefleet release ...``: create, sign, serve and inspect the release repository.

    edgefleet release init --repo build/repo [--root-keys 3 --root-threshold 2] [--offline-keys /media/keys]
    edgefleet release publish build/models/v2 --repo build/repo --channel canary --fleet shop \\
        [--broker mqtts://broker:8883 --ca pki/ca.crt --cert pki/service/trainer.crt --key pki/service/trainer.key]
    edgefleet release promote --repo build/repo --fleet shop --model colour          # canary -> stable
    edgefleet release rollback --repo build/repo --fleet shop --model colour --channel canary
    edgefleet release rotate-key timestamp --repo build/repo
    edgefleet release status --repo build/repo [--json]
    edgefleet release serve --repo build/repo --port 8080
    edgefleet release refresh --repo build/repo        # re-sign online metadata that is due (cron)
    edgefleet release export-root --repo build/repo --out root.json   # pin on devices at provisioning
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from edge_agent.updater.cohort import Cohort


def add_hint_broker(p: argparse.ArgumentParser, with_url: bool = True) -> None:
    """``--broker --ca --cert --key [--url]``: where a command sends its release hint (mutual TLS)."""
    g = p.add_argument_group("release hint (optional)")
    g.add_argument("--broker", help="send the retained hint to this broker (mqtt:// or mqtts://)")
    g.add_argument("--ca")
    g.add_argument(
        "--cert", help="the trainer's service certificate (the ACL lets only it write release topics)"
    )
    g.add_argument("--key")
    if with_url:
        g.add_argument("--url", help="repository URL named in the hint (default: the one given at init)")


def register_release(sub: argparse._SubParsersAction) -> None:
    """Add the ``release`` group."""
    p = sub.add_parser("release", help="signed model releases (TUF): init, publish, promote, rollback, serve")
    rs = p.add_subparsers(dest="release_cmd", required=True)
    _register_signing(rs)
    _register_channels(rs)
    _register_operations(rs)


def _register_signing(rs: argparse._SubParsersAction) -> None:
    """``init`` and ``publish``: create the repository, sign a package into a channel."""
    i = rs.add_parser("init", help="create keys and a new repository")
    i.add_argument("--repo", required=True)
    i.add_argument("--root-keys", type=int, default=3)
    i.add_argument("--root-threshold", type=int, default=2)
    i.add_argument(
        "--offline-keys", help="directory for the root and top-level targets keys (default: REPO/keys)"
    )
    i.add_argument("--channels", default="canary,stable")
    i.add_argument("--timestamp-hours", type=float, default=24.0, help="timestamp lifetime")
    i.add_argument("--url", help="the URL devices will use (recorded for hints)")
    i.set_defaults(func=_init)

    pub = rs.add_parser("publish", help="sign a model package into a channel")
    pub.add_argument("package")
    pub.add_argument("--repo", required=True)
    pub.add_argument("--channel", required=True)
    pub.add_argument("--fleet", required=True)
    pub.add_argument("--min-agent-version", default="0")
    pub.add_argument("--hardware", default="", help="comma-separated hardware tags (empty: any device)")
    pub.add_argument(
        "--canary-share", type=float, help="canary only: share of the fleet (0..1) that takes it"
    )
    pub.add_argument("--cohort-salt", help="salt of the canary cohort hash (default: the fleet name)")
    pub.add_argument(
        "--db",
        help="the trainer's database: record the release (and a canary's rollout) so the service, "
        "`edgefleet rollout` and the console know of it",
    )
    add_hint_broker(pub)
    pub.set_defaults(func=_publish)


def _register_channels(rs: argparse._SubParsersAction) -> None:
    """``promote`` and ``rollback``: move what a channel offers."""
    pr = rs.add_parser("promote", help="offer a channel's current release on another channel")
    pr.add_argument("--repo", required=True)
    pr.add_argument("--fleet", required=True)
    pr.add_argument("--model", required=True)
    pr.add_argument("--from", dest="from_channel", default="canary")
    pr.add_argument("--to", dest="to_channel", default="stable")
    pr.add_argument("--release", type=int, help="promote this release instead of the current one")
    add_hint_broker(pr)
    pr.set_defaults(func=_promote)

    rb = rs.add_parser(
        "rollback", help="roll a channel forward onto an earlier artifact (new, higher counter)"
    )
    rb.add_argument("--repo", required=True)
    rb.add_argument("--fleet", required=True)
    rb.add_argument("--model", required=True)
    rb.add_argument("--channel", required=True)
    rb.add_argument("--to", dest="to_release", type=int, help="the release whose artifact to restore")
    add_hint_broker(rb)
    rb.set_defaults(func=_rollback)


def _register_operations(rs: argparse._SubParsersAction) -> None:
    """``rotate-key``, ``status``, ``serve``, ``refresh`` and ``export-root``: keep the repository running."""
    rk = rs.add_parser("rotate-key", help="replace a role's keys (root: signed by old and new keys)")
    rk.add_argument("role", help="root, targets, snapshot, timestamp or a channel")
    rk.add_argument("--repo", required=True)
    rk.set_defaults(func=_rotate)

    st = rs.add_parser("status", help="roles, expiry, keys, channels and recent releases")
    st.add_argument("--repo", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    sv = rs.add_parser("serve", help="serve metadata and targets over HTTP and keep the timestamp fresh")
    sv.add_argument("--repo", required=True)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--resign-interval", type=float, default=60.0)
    sv.add_argument("--rate-limit", type=int, help="bytes per second per response (testing slow links)")
    sv.set_defaults(func=_serve)

    rf = rs.add_parser("refresh", help="re-sign online metadata that has used half its lifetime")
    rf.add_argument("--repo", required=True)
    rf.add_argument("--force", action="store_true")
    rf.set_defaults(func=_refresh)

    er = rs.add_parser("export-root", help="write the current root.json (to pin on devices)")
    er.add_argument("--repo", required=True)
    er.add_argument("--out", required=True)
    er.set_defaults(func=_export_root)


def _repo(path: str):  # noqa: ANN202 - lazy import keeps `edgefleet --help` fast
    from trainer.release.repository import ReleaseRepository

    return ReleaseRepository(path)


def _announce(args: argparse.Namespace, repo, record) -> None:  # noqa: ANN001
    print(
        f"release {record.release}: {record.model} {record.version} -> {record.channel} for fleet {record.fleet} "
        f"({record.action}) target {record.target} sha256 {record.sha256[:12]}... {record.length} bytes"
    )
    if args.broker:
        from trainer.release.hints import mqtt_settings, send_hint

        url = args.url or repo.config.get("url")
        send_hint(mqtt_settings(args.broker, args.ca, args.cert, args.key), record.hint(url))
        print(f"hint sent (retained) on ef/v1/{record.fleet}/release/{record.channel}")


def _init(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from trainer.release.repository import Expiry, ReleaseRepository

    repo = ReleaseRepository.init(
        args.repo,
        root_keys=args.root_keys,
        root_threshold=args.root_threshold,
        offline_keys=args.offline_keys,
        channels=tuple(c.strip() for c in args.channels.split(",") if c.strip()),
        expiry=Expiry(timestamp=timedelta(hours=args.timestamp_hours)),
        url=args.url,
    )
    print(
        f"initialised {repo.path}: root {args.root_threshold}-of-{args.root_keys}, channels {', '.join(repo.channels)}"
    )
    offline, online = Path(repo.config["offline_keys"]), (repo.path / "keys").resolve()
    if offline == online:
        print(f"keys: {online} (mode 0600); move the root-* and targets-* keys offline (see docs/updates.md)")
    else:
        print(f"keys: root and targets in {offline} (keep offline), online keys in {online}")
    print(f"pin on devices: edgefleet release export-root --repo {args.repo} --out root.json")
    return 0


def _publish(args: argparse.Namespace) -> int:
    repo = _repo(args.repo)
    hw = [h.strip() for h in args.hardware.split(",") if h.strip()]
    cohort = (
        Cohort.of_share(args.canary_share, args.cohort_salt or args.fleet)
        if args.canary_share is not None
        else None
    )
    rec = repo.publish(
        args.package,
        channel=args.channel,
        fleet=args.fleet,
        min_agent_version=args.min_agent_version,
        hardware=hw,
        cohort=cohort,
    )
    if args.db:
        _record(args, rec)
    _announce(args, repo, rec)
    return 0


def _record(args: argparse.Namespace, rec: Any) -> None:
    """The release in the trainer's store, as the service records its own: a canary with a cohort is an
    active rollout people can promote or abort; anything else is sent to the whole fleet."""
    import getpass

    from edge_agent.package import load_package
    from trainer.store import Store

    actor = getpass.getuser()
    with Store(args.db) as store:
        store.register_package(load_package(args.package), actor=actor)
        rid = store.record_release(
            fleet=rec.fleet,
            channel=rec.channel,
            model_sha256=rec.package_sha256,
            actor=actor,
            details={"release": rec.release, "version": rec.version},
        )
        canary = rec.cohort is not None and rec.channel == "canary"
        cohort = f"canary:{rec.cohort.share_bp}bp" if canary else "all"
        rollout = store.record_rollout(
            release_id=rid, fleet=rec.fleet, actor=actor, cohort=cohort, state="active" if canary else "done"
        )
    print(f"recorded in the trainer's store: release {rid}, rollout {rollout} ({cohort})")


def _promote(args: argparse.Namespace) -> int:
    repo = _repo(args.repo)
    rec = repo.promote(
        args.fleet,
        args.model,
        from_channel=args.from_channel,
        to_channel=args.to_channel,
        release=args.release,
    )
    _announce(args, repo, rec)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    repo = _repo(args.repo)
    rec = repo.rollback(args.fleet, args.model, args.channel, to_release=args.to_release)
    _announce(args, repo, rec)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    repo = _repo(args.repo)
    new = repo.rotate_key(args.role)
    print(f"{args.role}: new key(s) {', '.join(k[:12] for k in new)}; old keys moved to retired/")
    if args.role == "root":
        print("devices accept the new root because it is signed by both the old and the new root keys")
    return 0


def _status(args: argparse.Namespace) -> int:
    st = _repo(args.repo).status()
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    print(f"repository {st['path']}")
    print(f"{'role':10s} {'version':>7s} {'expires in':>12s} threshold keys")
    for role, r in st["roles"].items():
        left = r["expires_in_s"]
        when = f"{left / 86400:.1f} d" if abs(left) >= 86400 else f"{left / 3600:.1f} h"
        keys = ", ".join(f"{k} ({v})" for k, v in r["keys"].items())
        print(f"{role:10s} {r['version']:7d} {when:>12s} {r['threshold']:9d} {keys}")
    for ch, recs in st["channels"].items():
        for r in recs:
            print(
                f"{ch:8s} {r['target']:40s} release {r['release']:4d} {r['model']} {r['version']} ({r['action']})"
            )
    print("recent releases:")
    for r in st["ledger"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["published"]))
        src = f" of release {r['source_release']}" if r.get("source_release") else ""
        print(
            f"  {r['release']:4d} {when} {r['channel']:7s} {r['fleet']}/{r['model']} {r['version']} {r['action']}{src}"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from trainer.release.server import main as serve_main

    argv = [
        "--repo",
        args.repo,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--resign-interval",
        str(args.resign_interval),
    ]
    if args.rate_limit:
        argv += ["--rate-limit", str(args.rate_limit)]
    return serve_main(argv)


def _refresh(args: argparse.Namespace) -> int:
    done = _repo(args.repo).refresh(force=args.force)
    print("re-signed: " + (", ".join(done) if done else "nothing due"))
    return 0


def _export_root(args: argparse.Namespace) -> int:
    data = _repo(args.repo).root_bytes()
    Path(args.out).write_bytes(data)
    print(f"wrote {args.out} (root version {json.loads(data)['signed']['version']})")
    return 0
