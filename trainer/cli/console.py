"""``edgefleet console``: serve the fleet manager console, and manage its users and API tokens."""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
import threading
from datetime import UTC, datetime

from edge_agent.errors import ConfigError

ROLES = ("viewer", "labeller", "operator", "admin")


def register_console(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "console",
        help="the fleet manager console (web pages and REST API); `console user|token ...` manage access",
        description="Serve the console on the trainer's store: edgefleet console --config trainer.yaml",
    )
    p.add_argument("--config", help="trainer YAML (its store, repository, broker and console: section)")
    p.add_argument("--host", help="listen address (default: console.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: console.port, 8090)")
    p.set_defaults(func=_serve)
    csub = p.add_subparsers(dest="console_cmd")
    u = csub.add_parser("user", help="console users: add, remove, list")
    usub = u.add_subparsers(dest="user_cmd", required=True)
    add = usub.add_parser("add", help="create a user (the password is read from the terminal or stdin)")
    add.add_argument("username")
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin (scripts)")
    rm = usub.add_parser("remove", help="delete a user, their sessions and tokens")
    rm.add_argument("username")
    usub.add_parser("list", help="users and roles")
    t = csub.add_parser("token", help="API tokens for automation: add, remove, list")
    tsub = t.add_subparsers(dest="token_cmd", required=True)
    tadd = tsub.add_parser("add", help="a new token acting as USER (printed once)")
    tadd.add_argument("username")
    tadd.add_argument("--name", required=True, help="what it is for (kept in the audit log)")
    trm = tsub.add_parser("remove", help="revoke a token by id")
    trm.add_argument("id", type=int)
    tsub.add_parser("list", help="tokens (ids, names, users; never the tokens themselves)")
    for parser in (add, rm, tadd, trm):
        parser.set_defaults(func=_manage)
    for parser in usub.choices.values():
        parser.add_argument("--config", dest="sub_config", help="trainer YAML")
        parser.add_argument("--db", help="the trainer's database URL (instead of --config)")
        parser.set_defaults(func=_manage)
    for parser in tsub.choices.values():
        parser.add_argument("--config", dest="sub_config", help="trainer YAML")
        parser.add_argument("--db", help="the trainer's database URL (instead of --config)")
        parser.set_defaults(func=_manage)


def _db_url(args: argparse.Namespace) -> str:
    if getattr(args, "db", None):
        return str(args.db)
    path = getattr(args, "sub_config", None) or args.config
    if not path:
        raise ConfigError("console: pass --config trainer.yaml or --db URL")
    from trainer.fleet.config import load_service_config

    return load_service_config(path).db_url


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if env := os.environ.get("EDGEFLEET_CONSOLE_PASSWORD"):
        return env
    first = getpass.getpass(f"password for {args.username}: ")
    if first != getpass.getpass("again: "):
        raise ConfigError("the two passwords differ")
    return first


def _manage(args: argparse.Namespace) -> int:
    from trainer.console.auth import hash_password, new_token, token_hash
    from trainer.store import Store
    from trainer.store import console_users as cu

    actor = getpass.getuser()
    with Store(_db_url(args)) as store:
        if args.console_cmd == "user":
            if args.user_cmd == "add":
                try:
                    hashed = hash_password(_password(args))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from exc
                cu.add_user(store, args.username, hashed, args.role, actor=actor)
                print(f"added {args.username} ({args.role})")
            elif args.user_cmd == "remove":
                if not cu.remove_user(store, args.username, actor=actor):
                    print(f"no console user {args.username!r}")
                    return 1
                print(f"removed {args.username}")
            else:
                for u in cu.users(store):
                    print(f"{u.username}\t{u.role}\tsince {_day(u.created_at)}")
            return 0
        if args.token_cmd == "add":
            token = new_token()
            tid = cu.add_token(store, args.username, args.name, token_hash(token), actor=actor)
            print(
                f"token {tid} for {args.username} ({args.name}); send it as 'Authorization: Bearer <token>':"
            )
            print(token)
        elif args.token_cmd == "remove":
            if not cu.remove_token(store, args.id, actor=actor):
                print(f"no token {args.id}")
                return 1
            print(f"revoked token {args.id}")
        else:
            for t in cu.tokens(store):
                used = _day(t.last_used_at) if t.last_used_at else "never"
                print(f"{t.id}\t{t.username}\t{t.name}\tsince {_day(t.created_at)}\tlast used {used}")
    return 0


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _serve(args: argparse.Namespace) -> int:
    if getattr(args, "console_cmd", None):
        return _manage(args)
    if not args.config:
        raise ConfigError("edgefleet console: pass --config trainer.yaml")
    from trainer.console.server import ConsoleServer, context_for
    from trainer.fleet.config import ConsoleSettings, load_service_config
    from trainer.store import Store
    from trainer.store.console_users import users

    cfg = load_service_config(args.config)
    settings = (cfg.console or ConsoleSettings()).model_copy()
    if args.host:
        settings.host = args.host
    if args.port is not None:
        settings.port = args.port
    store = Store(cfg.db_url)
    if not users(store):
        print(
            "no console users yet: add one with `edgefleet console user add NAME --role admin --config ...`"
        )
    server = ConsoleServer(context_for(cfg, store, settings), settings).start()
    print(f"console at {server.url} (Ctrl-C stops it)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server.serve_until(done)  # tells systemd it is ready and, while it answers, alive
    server.stop()
    store.close()
    return 0
