"""``edgefleet db upgrade | current``: migrate the trainer's database to this release's schema, or show
which revision it is at.

The service, the console and ingest refuse a database whose schema is older than this release's (one
line naming both revisions, exit 2); ``edgefleet db upgrade --db URL`` (or ``--config trainer.yaml``)
is the deliberate step that migrates it, after a backup. Running it again does nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def register_db(sub: argparse._SubParsersAction) -> None:
    """Add the ``db`` group to the ``edgefleet`` command line."""
    p = sub.add_parser(
        "db",
        help="the trainer's database schema: upgrade it to this release, show its revision",
        description="Schema migrations of the trainer's store (Alembic revisions shipped with edgefleet). "
        "Back the database up before `upgrade`.",
    )
    dsub = p.add_subparsers(dest="db_cmd", required=True)
    commands: tuple[tuple[str, str, Callable[[argparse.Namespace], int]], ...] = (
        (
            "upgrade",
            "migrate the database to this release's schema (a database from before migrations is "
            "recognised by its tables first); a no-op when it is there already",
            _upgrade,
        ),
        (
            "current",
            "print the database's revision and whether it is this release's (exit 1 if not)",
            _current,
        ),
    )
    for name, helptext, func in commands:
        c = dsub.add_parser(name, help=helptext, description=helptext)
        where = c.add_mutually_exclusive_group(required=True)
        where.add_argument("--db", help="sqlite:///FILE or postgresql+psycopg://user@host/db")
        where.add_argument("--config", help="the trainer YAML whose store to use (see deploy/trainer.yaml)")
        c.set_defaults(func=func)


def _url(args: argparse.Namespace) -> str:
    if args.db:
        return str(args.db)
    from trainer.fleet.config import load_service_config

    return load_service_config(args.config).db_url


@contextmanager
def _opened(args: argparse.Namespace, failed: str) -> Iterator[Any]:
    """The store, opened without creating or checking its schema; a database error (an unreachable
    server, a statement the database refuses) is one line starting with ``failed``."""
    from sqlalchemy.exc import DBAPIError

    from trainer.errors import StoreError
    from trainer.store import Store

    store = Store(_url(args), create=False, check=False)
    try:
        yield store
    except DBAPIError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise StoreError(f"{store.shown_url}: {failed}: {reason}") from exc
    finally:
        store.close()


def _upgrade(args: argparse.Namespace) -> int:
    from trainer.store.migrate import upgrade

    with (
        _opened(args, "the upgrade failed and was rolled back (nothing changed)") as store,
        store.write() as conn,
    ):
        done = upgrade(conn, store.shown_url)
    url, before, after = store.shown_url, done.before, done.after
    if not done.changed:
        print(f"{url}: already at revision {after} (this release's): nothing to do")
    elif before.revision is None:
        print(f"{url}: created the schema at revision {after}")
    elif not before.recorded:
        then = "" if before.revision == after else f", then upgraded it to {after}"
        print(
            f"{url}: recognised revision {before.revision} (a database from before migrations), recorded it{then}"
        )
    else:
        print(f"{url}: upgraded from revision {before.revision} to {after}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from trainer.store.migrate import known, state

    with _opened(args, "cannot read the database") as store, store.engine.connect() as conn:
        st = state(conn, store.shown_url)
    url, rev = store.shown_url, st.revision
    run = f"run `edgefleet db upgrade --db {url}`"
    if rev is None:
        print(
            f"{url}: no schema yet (no tables of the store); `edgefleet db upgrade` creates revision {st.head}"
        )
    elif st.recorded and not known(rev):
        print(
            f"{url}: revision {rev}, unknown to this release (its newest is {st.head}): a newer release upgraded it"
        )
    else:
        how = "" if st.recorded else ", recognised from its tables (a database from before migrations)"
        verdict = "this release's" if st.at_head else f"this release needs {st.head}: {run}"
        print(f"{url}: revision {rev}{how}; {verdict}")
    return 0 if st.at_head else 1
