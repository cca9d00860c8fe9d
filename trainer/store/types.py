"""Column types shared by both dialects: JSON documents passed through as text, without re-encoding.

Ingest receives JSON that was just validated; parsing it into a dict only to serialise it again for
the database would double the per-message cost. :class:`RawJSON` binds a ``str`` (JSON text) as is and
returns the stored text unparsed, so callers decode it with pydantic's ``model_validate_json``.

On PostgreSQL the column is ``json`` (the text as sent, checked by the server, queryable with
``->``/``->>``), not ``jsonb``: building jsonb for a ~3.5 KB telemetry window roughly doubled the
server's cost per inserted window in ``bench/ingest_bench.py`` (measured 260 vs 120 us/window with
psycopg executemany), and ingest is the hot path. A jsonb copy or expression index can be added for
queries that need one. On SQLite the column is JSON text.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import JSON, Dialect
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import TypeDecorator, TypeEngine


class RawJSON(TypeDecorator[str]):
    """A JSON column whose Python value is the JSON text itself (``str``); dicts are encoded on bind."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(postgresql.JSON() if dialect.name == "postgresql" else JSON())

    def bind_processor(self, dialect: Dialect):  # noqa: ANN201 - SQLAlchemy hook
        def process(value: Any) -> str | None:
            if value is None or isinstance(value, str):
                return value
            if isinstance(value, bytes | bytearray):
                return value.decode()
            return json.dumps(value, separators=(",", ":"))

        return process

    def result_processor(self, dialect: Dialect, coltype: object):  # noqa: ANN201 - SQLAlchemy hook
        def process(value: Any) -> str | None:
            if value is None or isinstance(value, str):
                return value
            return json.dumps(value, separators=(",", ":"))  # a driver that decoded it anyway

        return process
