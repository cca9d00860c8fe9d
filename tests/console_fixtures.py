"""Console test fixtures: a seeded store (SQLite or PostgreSQL) with its app, logged-in clients per
role, and a live console server for the browser tests. Import the fixtures into a test module with
``from tests.console_fixtures import *`` (pytest picks them up from there)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from trainer.console.app import create_app
from trainer.console.deps import ConsoleContext
from trainer.console.server import ConsoleServer
from trainer.fleet.config import ConsoleSettings
from trainer.sim.console_seed import ConsoleSeed, seed_console
from trainer.store import Store

__all__ = ["Seeded", "seeded", "login", "live_console"]


class Seeded:
    """A seeded store, its seed description and a console app on it."""

    def __init__(self, store: Store, seed: ConsoleSeed) -> None:
        self.store, self.seed = store, seed
        self.ctx = ConsoleContext(
            store=store, fleet=seed.fleet, model=seed.champion.manifest.name, repo_path=seed.repo_path
        )
        self.app = create_app(self.ctx)

    def client(self, role: str | None = None) -> TestClient:
        """A client logged in as the seeded user of ``role`` (anonymous for None)."""
        c = TestClient(self.app)
        if role is not None:
            login(c, *self.seed.users[role])
        return c

    def csrf(self, client: TestClient) -> str:
        token = client.get("/api/v1/me").json()["csrf"]
        assert token
        return str(token)


def login(client: TestClient, username: str, password: str) -> None:
    r = client.post(
        "/login", data={"username": username, "password": password, "next": "/fleet"}, follow_redirects=False
    )
    assert r.status_code == 303, r.text


@pytest.fixture
def seeded(db_url: str, tmp_path: Path) -> Iterator[Seeded]:
    """A 12-device fleet with 6 hours of 60 s windows, samples, alerts and a running canary; on SQLite
    and on PostgreSQL (``db_url`` is parametrised)."""
    store = Store(db_url)
    seed = seed_console(store, tmp_path / "seed", now=time.time())
    yield Seeded(store, seed)
    store.close()


@pytest.fixture
def live_console(tmp_path: Path) -> Iterator[tuple[str, Seeded]]:
    """A console server (uvicorn on a free port) on a seeded SQLite store: (its URL, the seed)."""
    store = Store(f"sqlite:///{tmp_path / 'console.db'}")
    seed = seed_console(store, tmp_path / "seed", now=time.time())
    s = Seeded(store, seed)
    s.ctx.refresh_s = 2.0
    server = ConsoleServer(s.ctx, ConsoleSettings(port=0, refresh_s=2.0))
    server.start()
    try:
        yield server.url, s
    finally:
        server.stop()
        store.close()
