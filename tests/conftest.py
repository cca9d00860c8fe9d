"""Shared fixtures: private mosquitto brokers (plain and TLS), a PKI, and the pretrained model package.

Each test session starts its own mosquitto on a free port with a generated config; it never uses the
machine's broker on 1883. In CI (CI=true) a missing mosquitto binary fails the tests instead of
skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trainer.ops.broker import BrokerTLS, MosquittoBroker, find_mosquitto

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, what: str) -> None:
    """Skip locally, fail in CI, when a service the test needs is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but missing")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    path = find_mosquitto()
    require(path is not None, "the mosquitto binary")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: str) -> Iterator[MosquittoBroker]:
    """A plain-TCP private broker for the whole test session."""
    b = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), binary=mosquitto_binary).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server certificate for 127.0.0.1/localhost and a few client identities."""
    from trainer.ops import pki as pki_mod

    d = tmp_path_factory.mktemp("pki")
    pki_mod.init_ca(d)
    pki_mod.issue(d, "broker", kind="server", hosts=("127.0.0.1", "localhost"))
    for dev in ("dev-a", "dev-b"):
        pki_mod.issue(d, dev, kind="device")
    pki_mod.issue(d, "trainer", kind="service")
    return d


@pytest.fixture(scope="session")
def tls_broker(
    tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: str, pki: Path
) -> Iterator[MosquittoBroker]:
    """A TLS broker (server authentication only) for the whole test session."""
    tls = BrokerTLS(ca=pki / "ca.crt", cert=pki / "server" / "broker.crt", key=pki / "server" / "broker.key")
    b = MosquittoBroker(tmp_path_factory.mktemp("mosquitto-tls"), tls=tls, binary=mosquitto_binary).start()
    yield b
    b.stop()


@pytest.fixture
def broker_factory(tmp_path: Path, mosquitto_binary: str) -> Iterator[Callable[..., MosquittoBroker]]:
    """Brokers private to one test (for tests that kill and restart them)."""
    made: list[MosquittoBroker] = []

    def make(**kwargs: object) -> MosquittoBroker:
        b = MosquittoBroker(tmp_path / f"broker{len(made)}", binary=mosquitto_binary, **kwargs)  # type: ignore[arg-type]
        made.append(b)
        return b.start()

    yield make
    for b in made:
        b.stop(kill=True)


@pytest.fixture(scope="session")
def pretrained_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained EfficientNet-Lite0 exported into a full package once per session (~40 s).

    EDGEFLEET_TEST_PACKAGE points at an existing package to reuse between local runs.
    """
    reuse = os.environ.get("EDGEFLEET_TEST_PACKAGE")
    if reuse and Path(reuse, "model.json").is_file():
        return Path(reuse)
    from trainer.export.pretrained import export_pretrained

    out = tmp_path_factory.mktemp("packages") / "lite0"
    export_pretrained(out, calibration_count=64, progress=False)
    return out


# -- PostgreSQL -----------------------------------------------------------------------------------
PG_SERVER = os.environ.get("EDGEFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
"""A PostgreSQL server the tests may create databases on (trust auth); overridable for other setups."""


def _pg_admin_url() -> str | None:
    """The server URL if it answers, else None."""
    try:
        import psycopg
        from sqlalchemy.engine import make_url

        u = make_url(PG_SERVER)
        with psycopg.connect(
            host=u.host, port=u.port or 5432, user=u.username, dbname=u.database, connect_timeout=3
        ):
            return PG_SERVER
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return None


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A private database for this test session on the PostgreSQL server (dropped at the end)."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    admin = _pg_admin_url()
    require(admin is not None, f"PostgreSQL at {PG_SERVER}")
    u = make_url(PG_SERVER)
    name = f"ef_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    kw = {
        "host": u.host,
        "port": u.port or 5432,
        "user": u.username,
        "dbname": u.database,
        "autocommit": True,
    }
    with psycopg.connect(**kw) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield u.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(**kw) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A URL whose connections use a fresh, empty schema of the session database (dropped afterwards)."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(pg_database)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    kw = {
        "host": u.host,
        "port": u.port or 5432,
        "user": u.username,
        "dbname": u.database,
        "autocommit": True,
    }
    with psycopg.connect(**kw) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield u.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    with psycopg.connect(**kw) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs twice: on an SQLite file and on a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_url"))


# -- trainer models (issue 3): a small built-in dataset and one trained package per session ---------
SHAPES_DATA = "builtin:shapes?n=30"
"""240 rendered 320x240 frames of 8 classes: small enough to train and export in about a minute."""


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Backbone features shared by every training run of the session (each image is computed once)."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="session")
def shapes_dataset():  # type: ignore[no-untyped-def]
    from trainer.data import load_dataset

    return load_dataset(SHAPES_DATA)


def _small_train_config(**overrides: object):  # type: ignore[no-untyped-def]
    """A TrainConfig for tests: 128-pixel input, few corruptions, every format."""
    from trainer.build import RobustnessConfig, TrainConfig

    base: dict[str, object] = {
        "name": "shapes",
        "input_size": 128,
        "aug_views": 1,
        "robustness": RobustnessConfig(
            images=16, corruptions=["gaussian_noise", "defocus_blur"], severities=[1, 5]
        ),
        "progress": False,
    }
    base.update(overrides)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def shapes_package(tmp_path_factory: pytest.TempPathFactory, shapes_dataset, feature_cache: Path):  # type: ignore[no-untyped-def]
    """A classifier trained on SHAPES_DATA and exported with all four artifacts (about a minute)."""
    from trainer.build import train_package

    out = tmp_path_factory.mktemp("trained") / "shapes"
    return train_package(shapes_dataset, out, _small_train_config(feature_cache=str(feature_cache)))


@pytest.fixture(scope="session")
def shapes_uri() -> str:
    return SHAPES_DATA


@pytest.fixture
def small_train_config():  # type: ignore[no-untyped-def]
    """Factory of small test TrainConfigs (keyword overrides)."""
    return _small_train_config
