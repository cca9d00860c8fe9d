"""HTTP for the updater: a python-tuf fetcher on one urllib3 pool, plus resumable target downloads.

Metadata goes through python-tuf's own download checks (``FetcherInterface``). Targets are
downloaded with :meth:`HttpFetcher.download_resumable`: the bytes go to a ``.part`` file that
survives restarts, a later attempt continues it with an HTTP ``Range`` request, and the transfer is
capped at the length the signed metadata gives (more bytes than that is the "endless data" attack and
fails at once). The caller then checks length and hashes against the same signed metadata.

Every fetch has a deadline that starts before the request: connecting, the response headers and the
body must all arrive within it. A server dripping a byte every few seconds (never idle long enough for
the read timeout), in the headers or in the body, cannot hang the updater.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.response import HTTPResponse

from edge_agent import __version__
from edge_agent.socket_deadline import SocketDeadline

CHUNK = 64 * 1024
FSYNC_EVERY = 4 * 1024 * 1024
"""A partial download is fsynced every few MB, so a power cut loses little and never leaves a hole."""


_ACTIVE: ContextVar[SocketDeadline | None] = ContextVar("edgefleet_fetch_deadline", default=None)
"""The deadline of the fetch running on this thread, for the pool's connections to register with."""


def _late(url: str, deadline: SocketDeadline) -> tuf_exc.SlowRetrievalError:
    """The error of a fetch that did not complete in time."""
    return tuf_exc.SlowRetrievalError(f"{url}: not complete within {deadline.seconds:.0f} s")


def _connect_watched(conn: HTTPConnection, connect: Callable[[], socket.socket]) -> socket.socket:
    """Connect within what is left of the current fetch's deadline, and let the deadline watch the socket
    (a TLS handshake dripped by the server is then cut off too)."""
    deadline = _ACTIVE.get()
    if deadline is not None and isinstance(conn.timeout, (int, float)):
        conn.timeout = max(0.001, min(conn.timeout, deadline.remaining()))
    sock = connect()
    if deadline is not None:
        deadline.watch(sock)
    return sock


def _respond_watched(conn: HTTPConnection) -> None:
    """Before the response headers are read (possibly on a reused connection), the deadline watches it."""
    deadline = _ACTIVE.get()
    if deadline is not None and conn.sock is not None:
        deadline.watch(conn.sock)


class _WatchedHTTPConnection(HTTPConnection):
    """An HTTP connection whose socket the current fetch's deadline can shut down."""

    def _new_conn(self) -> socket.socket:
        return _connect_watched(self, super()._new_conn)

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        _respond_watched(self)
        return super().getresponse()


class _WatchedHTTPSConnection(HTTPSConnection):
    """An HTTPS connection whose socket the current fetch's deadline can shut down."""

    def _new_conn(self) -> socket.socket:
        return _connect_watched(self, super()._new_conn)

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        _respond_watched(self)
        return super().getresponse()


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    """The pool the fetcher's PoolManager makes for http:// URLs."""

    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    """The pool the fetcher's PoolManager makes for https:// URLs."""

    ConnectionCls = _WatchedHTTPSConnection


class HttpFetcher(FetcherInterface):
    """One connection pool per updater check; ``close`` releases it.

    ``timeout_s`` bounds each connect and each read; ``deadline_s`` bounds a whole fetch, from before the
    request to the last byte (connect, headers and body), so a server dripping a byte every few seconds
    (never idle long enough for the read timeout) cannot hang it.
    """

    def __init__(self, timeout_s: float = 30.0, deadline_s: float = 600.0) -> None:
        self.timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self.deadline_s = deadline_s
        self._pool = urllib3.PoolManager(
            headers={"User-Agent": f"edgefleet-agent/{__version__}"},
            retries=urllib3.Retry(total=2, connect=2, read=0, redirect=0, backoff_factor=0.2),
            maxsize=2,
        )
        self._pool.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
        self.requests = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        deadline = SocketDeadline(self.deadline_s)
        try:
            response = self._request(url, {}, deadline)
            if response.status >= 400:
                _discard(response)
                raise tuf_exc.DownloadHTTPError(f"HTTP {response.status} for {url}", response.status)
        except BaseException:
            deadline.close()
            raise
        return self._chunks(response, url, deadline)

    def _request(
        self, url: str, headers: dict[str, str], deadline: SocketDeadline
    ) -> urllib3.BaseHTTPResponse:
        """Send the request and read the response headers, all within ``deadline``."""
        self.requests += 1
        token = _ACTIVE.set(deadline)  # the pool's connections find the deadline here
        try:
            return self._pool.request(
                "GET", url, headers=headers, preload_content=False, timeout=self.timeout
            )
        except urllib3.exceptions.MaxRetryError as exc:
            if deadline.passed():
                raise _late(url, deadline) from exc
            if isinstance(exc.reason, urllib3.exceptions.TimeoutError):
                raise tuf_exc.SlowRetrievalError(str(exc)) from exc
            raise tuf_exc.DownloadError(f"cannot reach {url}: {exc.reason}") from exc
        except urllib3.exceptions.HTTPError as exc:
            if deadline.passed():
                raise _late(url, deadline) from exc
            raise tuf_exc.DownloadError(f"cannot reach {url}: {exc}") from exc
        finally:
            _ACTIVE.reset(token)

    def _chunks(
        self, response: urllib3.BaseHTTPResponse, url: str, deadline: SocketDeadline
    ) -> Iterator[bytes]:
        """The body as it arrives, within the fetch's ``deadline`` (which then ends)."""
        try:
            yield from response.stream(CHUNK)  # bytes reach the partial file as they arrive
            if deadline.expired:  # cut off: what arrived is not the whole response
                raise _late(url, deadline)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if deadline.passed() or isinstance(exc, urllib3.exceptions.TimeoutError):
                raise _late(url, deadline) from exc
            raise tuf_exc.DownloadError(str(exc)) from exc
        finally:
            deadline.close()
            response.release_conn()

    def download_resumable(self, url: str, part: Path, length: int) -> int:
        """Complete ``part`` to exactly ``length`` bytes from ``url``; returns the offset it resumed from.

        Raises ``DownloadLengthMismatchError`` when the server sends more than ``length`` bytes in total
        (the partial file is deleted) and ``DownloadError`` for network and HTTP failures (the partial
        file is kept for the next attempt).
        """
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        if have == length:
            return have
        deadline = SocketDeadline(self.deadline_s)
        try:
            response = self._request(url, {"Range": f"bytes={have}-"} if have else {}, deadline)
            mode, start = _write_mode(response, have)
            if not mode:
                _discard(response)
                raise tuf_exc.DownloadHTTPError(f"HTTP {response.status} for {url}", response.status)
        except BaseException:
            deadline.close()
            raise
        got = start
        since_sync = 0
        with open(part, mode) as f:
            for chunk in self._chunks(response, url, deadline):
                got += len(chunk)
                if got > length:
                    f.close()
                    part.unlink(missing_ok=True)
                    raise tuf_exc.DownloadLengthMismatchError(
                        f"{url}: server sent more than the {length} bytes the signed metadata allows"
                    )
                f.write(chunk)
                since_sync += len(chunk)
                if since_sync >= FSYNC_EVERY:
                    f.flush()
                    os.fsync(f.fileno())
                    since_sync = 0
            f.flush()
            os.fsync(f.fileno())
        if got < length:
            raise tuf_exc.DownloadError(f"{url}: connection ended after {got} of {length} bytes")
        return start

    def close(self) -> None:
        self._pool.clear()


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Read and drop an unwanted body so the keep-alive connection can be reused safely."""
    try:
        response.drain_conn()
    finally:
        response.release_conn()


def _write_mode(response: urllib3.BaseHTTPResponse, have: int) -> tuple[str, int]:
    """How to write the body to a partial file holding ``have`` bytes: append from ``have`` (the server
    continued the range), rewrite from 0 (it sent everything), or ``""`` (an error response)."""
    if response.status == 206 and have and _range_start(response.headers.get("Content-Range")) == have:
        return "ab", have
    if response.status == 200:
        return "wb", 0
    return "", 0


def _range_start(content_range: str | None) -> int | None:
    """Start offset of ``Content-Range: bytes START-END/TOTAL`` (None if absent or malformed)."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    try:
        return int(content_range[6:].split("-", 1)[0])
    except ValueError:
        return None
