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

from trainer.broker import BrokerTLS, MosquittoBroker, find_mosquitto

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
    from trainer import pki as pki_mod

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
    from trainer.pretrained import export_pretrained

    out = tmp_path_factory.mktemp("packages") / "lite0"
    export_pretrained(out, calibration_count=64, progress=False)
    return out
