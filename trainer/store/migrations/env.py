"""Alembic's environment for the store: migrate the connection the caller handed over.

:mod:`trainer.store.migrate` puts an open connection, inside its transaction, in
``config.attributes["connection"]``, so a whole upgrade (stamp included) commits or rolls back as one.
Without one, the database named by the ``sqlalchemy.url`` option is opened with the store's engine
settings. Offline mode (``--sql``) prints the DDL for that URL's dialect instead of running it.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection

from trainer.errors import StoreError
from trainer.store.engine import make_engine
from trainer.store.schema import Base

OPTIONS: dict[str, Any] = {
    "target_metadata": Base.metadata,
    "render_as_batch": True,  # autogenerate writes SQLite-safe ALTERs (a table copy where needed)
    "compare_type": True,
}


def _run(connection: Connection) -> None:
    """Run the pending revisions on ``connection`` (in the caller's transaction when it has one)."""
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    config = context.config
    url = config.get_main_option("sqlalchemy.url")
    connection = config.attributes.get("connection")
    if context.is_offline_mode():
        context.configure(url=url, literal_binds=True, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
    elif connection is not None:
        _run(connection)
    elif url:
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                _run(conn)
        finally:
            engine.dispose()
    else:
        raise StoreError("migrations: no connection and no sqlalchemy.url to migrate")


_main()
