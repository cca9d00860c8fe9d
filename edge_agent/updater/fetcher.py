"""HTTP for the updater: a python-tuf fetcher on one urllib3 pool, plus resumable target downloads.

Metadata goes through python-tuf's own download checks (``FetcherInterface``). Targets are
downloaded with :meth:`HttpFetcher.download_resumable`: the bytes go to a ``.part`` file that
survives restarts, a later attempt continues it with an HTTP ``Range`` request, and the transfer is
capped at the length the signed metadata gives (more bytes than that is the "endless data" attack and
fails at once). The caller then checks length and hashes against the same signed metadata.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from edge_agent import __version__

CHUNK = 64 * 1024
FSYNC_EVERY = 4 * 1024 * 1024
"""A partial download is fsynced every few MB, so a power cut loses little and never leaves a hole."""


class HttpFetcher(FetcherInterface):
    """One connection pool per updater check; ``close`` releases it.

    ``timeout_s`` bounds each connect and each read; ``deadline_s`` bounds a whole transfer, so a server
    dripping a byte every few seconds (never idle long enough for the read timeout) cannot hang it.
    """

    def __init__(self, timeout_s: float = 30.0, deadline_s: float = 600.0) -> None:
        self.timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self.deadline_s = deadline_s
        self._pool = urllib3.PoolManager(
            headers={"User-Agent": f"edgefleet-agent/{__version__}"},
            retries=urllib3.Retry(total=2, connect=2, read=0, redirect=0, backoff_factor=0.2),
            maxsize=2,
        )
        self.requests = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self._request(url, {})
        if response.status >= 400:
            _discard(response)
            raise tuf_exc.DownloadHTTPError(f"HTTP {response.status} for {url}", response.status)
        return self._chunks(response, url)

    def _request(self, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        self.requests += 1
        try:
            return self._pool.request(
                "GET", url, headers=headers, preload_content=False, timeout=self.timeout
            )
        except urllib3.exceptions.MaxRetryError as exc:
            if isinstance(exc.reason, urllib3.exceptions.TimeoutError):
                raise tuf_exc.SlowRetrievalError(str(exc)) from exc
            raise tuf_exc.DownloadError(f"cannot reach {url}: {exc.reason}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exc.DownloadError(f"cannot reach {url}: {exc}") from exc

    def _chunks(self, response: urllib3.BaseHTTPResponse, url: str) -> Iterator[bytes]:
        """The body as it arrives; past ``deadline_s`` the socket is shut down from a timer (a blocked
        read cannot otherwise be interrupted) and the transfer fails as too slow."""
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            response.shutdown()

        timer = threading.Timer(self.deadline_s, expire)
        timer.daemon = True
        timer.start()
        try:
            yield from response.stream(CHUNK)  # bytes reach the partial file as they arrive
            if expired.is_set():
                raise tuf_exc.SlowRetrievalError(f"{url}: not complete within {self.deadline_s:.0f} s")
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if expired.is_set() or isinstance(exc, urllib3.exceptions.TimeoutError):
                raise tuf_exc.SlowRetrievalError(
                    f"{url}: not complete within {self.deadline_s:.0f} s"
                ) from exc
            raise tuf_exc.DownloadError(str(exc)) from exc
        finally:
            timer.cancel()
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
        response = self._request(url, {"Range": f"bytes={have}-"} if have else {})
        if response.status == 206 and have and _range_start(response.headers.get("Content-Range")) == have:
            mode, start = "ab", have
        elif response.status == 200:
            mode, start = "wb", 0
        else:
            _discard(response)
            raise tuf_exc.DownloadHTTPError(f"HTTP {response.status} for {url}", response.status)
        got = start
        since_sync = 0
        with open(part, mode) as f:
            for chunk in self._chunks(response, url):
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


def _range_start(content_range: str | None) -> int | None:
    """Start offset of ``Content-Range: bytes START-END/TOTAL`` (None if absent or malformed)."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    try:
        return int(content_range[6:].split("-", 1)[0])
    except ValueError:
        return None
