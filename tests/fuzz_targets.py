"""Fuzz targets: every parser that takes outside input, as ``bytes -> None`` functions.

A target may fail only with the error its parser documents (a one-line, named problem); anything else
escaping it is a crash. The same targets run two ways:

* ``tests/test_fuzz.py``: a short seeded Hypothesis pass in ``make test``, plus every input kept under
  ``tests/fuzz_corpus/<target>/`` (the seeds, and each crash ever found, as a regression input);
* ``bench/fuzz_bench.py``: atheris (coverage-guided libFuzzer) for a bounded time per target in
  ``make bench``; a crash it finds is written to the corpus directory.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"


@dataclass(frozen=True)
class Target:
    """One fuzz target: the function and the exceptions that are its documented refusals."""

    name: str
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]

    def __call__(self, data: bytes) -> None:
        with contextlib.suppress(self.allowed):
            self.run(data)


def _pick(data: bytes, options: list[str]) -> tuple[str, bytes]:
    """The first byte chooses among ``options``; the rest is the payload."""
    if not data:
        return options[0], b""
    return options[data[0] % len(options)], data[1:]


def _mqtt_agent(data: bytes) -> None:
    """What a device parses from the broker: release hints and commands."""
    from edge_agent.protocol import Command, ReleaseHint, parse_message, release_topic

    kind, payload = _pick(data, ["hint", "cmd"])
    model = ReleaseHint if kind == "hint" else Command
    parse_message(release_topic("f", "stable"), payload, model)


def _mqtt_ingest(data: bytes) -> None:
    """What ingest classifies: every device message kind; it must answer, never raise."""
    from trainer.ingest.routing import Accepted, classify
    from trainer.store import Rejected

    kind, payload = _pick(data, ["tele", "status", "sample", "update", "pred"])
    result = classify(f"ef/v1/f/dev/cam-1/{kind}", payload, 0.0)
    assert isinstance(result, Accepted | Rejected)


def _with_file(suffix: str, data: bytes, use: Callable[[Path], object]) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"input{suffix}"
        p.write_bytes(data)
        use(p)


def _agent_yaml(data: bytes) -> None:
    from edge_agent.config import load_config

    _with_file(".yaml", data, load_config)


def _trainer_yaml(data: bytes) -> None:
    from trainer.fleet.config import load_service_config

    _with_file(".yaml", data, load_service_config)


def _model_json(data: bytes) -> None:
    from edge_agent.package import load_package

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.json").write_bytes(data)
        load_package(d)


def _archive(data: bytes) -> None:
    from edge_agent.updater.archive import unpack_archive

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "t.tar").write_bytes(data)
        unpack_archive(Path(d) / "t.tar", Path(d) / "out", max_bytes=1 << 20, max_files=64)


def _label_csv(data: bytes) -> None:
    from trainer.fleet.labelling import read_label_rows

    _with_file(".csv", data, lambda p: read_label_rows(p, ["circle", "square", "triangle"]))


def _image_header(data: bytes) -> None:
    from edge_agent.image_header import check_image_size

    check_image_size(data)


class _Server:
    """One release server for the whole fuzz run (started on first use)."""

    server = None
    lock = threading.Lock()

    @classmethod
    def port(cls) -> int:
        with cls.lock:
            if cls.server is None:
                from trainer.release.server import ReleaseServer

                root = Path(tempfile.mkdtemp(prefix="fuzz-repo-"))
                (root / "metadata").mkdir()
                (root / "metadata" / "1.root.json").write_text("{}")
                (root / "keys").mkdir()
                (root / "keys" / "secret.key").write_text("never served")
                cls.server = ReleaseServer(root).start()
                cls.server._httpd.idle_timeout_s = 1.0
            return cls.server.port


def _http_request(data: bytes) -> None:
    """Raw bytes as an HTTP request to the release server: it answers or closes, never serves a key,
    and keeps serving."""
    port = _Server.port()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data + b"\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert b"never served" not in reply, data
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # and it still serves
        s.sendall(b"GET /metadata/1.root.json HTTP/1.0\r\n\r\n")
        assert s.recv(65536).split(b"\r\n", 1)[0].endswith(b" 200 OK"), "the server stopped serving"


def _targets() -> dict[str, Target]:
    from edge_agent.errors import ConfigError, PackageError
    from edge_agent.image_header import ImageHeaderError
    from edge_agent.protocol import MessageError
    from edge_agent.updater.archive import ArchiveError
    from trainer.errors import LabelImportError

    return {
        t.name: t
        for t in (
            Target("mqtt_agent", _mqtt_agent, (MessageError,)),
            Target("mqtt_ingest", _mqtt_ingest, ()),
            Target("agent_yaml", _agent_yaml, (ConfigError,)),
            Target("trainer_yaml", _trainer_yaml, (ConfigError,)),
            Target("model_json", _model_json, (PackageError,)),
            Target("archive", _archive, (ArchiveError,)),
            Target("label_csv", _label_csv, (LabelImportError,)),
            Target("image_header", _image_header, (ImageHeaderError,)),
            Target("http_request", _http_request, (ConnectionError, TimeoutError)),
        )
    }


TARGETS = _targets()


def corpus(name: str) -> list[tuple[str, bytes]]:
    """The kept inputs of a target (seeds and regression crashes), as (file name, bytes)."""
    d = CORPUS / name
    return sorted((p.name, p.read_bytes()) for p in d.iterdir() if p.is_file()) if d.is_dir() else []
