"""Serve a release repository over HTTP: ``/metadata/...`` and ``/targets/...``, with byte ranges.

A small threaded server from the standard library: GET and HEAD of files under the repository's
``metadata/`` and ``targets/`` (nothing else, no listings, no path escapes), single byte ranges so
devices resume interrupted downloads, HTTP/1.1 keep-alive with an idle timeout, request counters at
``/_stats``, an optional bandwidth cap (to exercise slow links), and, when given the repository, a
timer that re-signs the timestamp (and anything else due) before it expires. Any static host or
object store can serve the same two directories instead.

    server = ReleaseServer("build/repo", port=8080, repository=ReleaseRepository("build/repo")).start()
    ...; server.stop()

``python -m trainer.release.server --repo DIR --port 8080`` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import socket
import stat
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
SERVED = ("metadata", "targets")
MAX_CONNECTIONS = 256
"""Connections served at once; more are answered 503 and closed (one thread each)."""
IDLE_TIMEOUT_S = 10.0
"""A connection that makes no progress for this long is closed: a request's line and headers must
arrive within it in total (one byte every few seconds is no progress), and a download must move."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections are closed after this many seconds
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.debug("%s " + format, self.address_string(), *args)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/_stats":
            body = json.dumps(self.server.stats()).encode()
            self._reply(200, body, "application/json")
            return
        self._serve(head=False)

    def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.server.count(status, len(body))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def setup(self) -> None:
        super().setup()
        self.server.watch(self.connection)

    def finish(self) -> None:
        self.server.unwatch(self.connection)
        super().finish()

    def _resolve(self) -> Path | None:
        """The regular file a path names inside ``metadata/`` or ``targets/``, reached without any
        symbolic link (a link under targets/ could point at the signing keys)."""
        path = self.path.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        if len(parts) < 2 or parts[0] not in SERVED or any(p in (".", "..") or "\\" in p for p in parts):
            return None
        served = Path(os.path.realpath(self.server.root / parts[0]))
        f = served.joinpath(*parts[1:])
        try:
            if os.path.realpath(f) != str(f) or not stat.S_ISREG(os.lstat(f).st_mode):
                return None
        except OSError:
            return None
        return f

    def _serve(self, head: bool) -> None:
        f = self._resolve()
        if f is None:
            self._reply(404, b"not found\n")
            return
        size = f.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng:
            m = _RANGE.match(rng.strip())
            if not m or int(m.group(1)) >= size or (m.group(2) and int(m.group(2)) < int(m.group(1))):
                self.server.count(416, 0)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            status = 206
        length = end - start + 1
        self.send_response(status)
        ctype = "application/json" if f.suffix == ".json" else "application/octet-stream"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Cache-Control", "no-cache" if f.name == "timestamp.json" else "max-age=60")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        sent = 0
        if not head:
            sent = self._copy(f, start, length)
        self.server.count(status, sent)

    def _copy(self, f: Path, start: int, length: int) -> int:
        rate = self.server.rate_limit_bps
        chunk = 64 * 1024 if not rate else max(1024, min(64 * 1024, rate // 20))
        sent = 0
        t0 = time.monotonic()
        with open(f, "rb") as src:
            src.seek(start)
            while sent < length:
                block = src.read(min(chunk, length - sent))
                if not block:
                    break
                try:
                    self.wfile.write(block)
                except OSError:  # the client went away, or the watchdog closed a stalled connection
                    break
                sent += len(block)
                self.server.progress(self.connection)
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        return sent


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, addr: tuple[str, int], root: Path, rate_limit_bps: int | None) -> None:
        super().__init__(addr, _Handler)
        self.root = root
        self.rate_limit_bps = rate_limit_bps
        self.max_connections = MAX_CONNECTIONS
        self.idle_timeout_s = IDLE_TIMEOUT_S
        self._lock = threading.Lock()
        self._status: Counter[int] = Counter()
        self._bytes = 0
        self._deadlines: dict[socket.socket, float] = {}
        self._open = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection, up to ``max_connections``; beyond that a 503 and close."""
        with self._lock:
            full = self._open >= self.max_connections
            if not full:
                self._open += 1
        if full:
            self.count(503, 0)
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open -= 1

    def watch(self, conn: socket.socket) -> None:
        """Start the idle clock of a connection (its request must arrive within the idle timeout)."""
        with self._lock:
            self._deadlines[conn] = time.monotonic() + self.idle_timeout_s

    def progress(self, conn: socket.socket) -> None:
        """The connection moved data: restart its idle clock."""
        with self._lock:
            if conn in self._deadlines:
                self._deadlines[conn] = time.monotonic() + self.idle_timeout_s

    def unwatch(self, conn: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)

    def close_stalled(self) -> int:
        """Shut down every connection past its deadline (its thread then ends); returns how many."""
        now = time.monotonic()
        with self._lock:
            stalled = [c for c, t in self._deadlines.items() if t < now]
            for c in stalled:
                self._deadlines.pop(c, None)
        for c in stalled:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        return len(stalled)

    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-transfer (devices lose power too) is normal, not a traceback."""
        log.debug("connection from %s ended abruptly", client_address, exc_info=True)

    def count(self, status: int, nbytes: int) -> None:
        with self._lock:
            self._status[status] += 1
            self._bytes += nbytes

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": sum(self._status.values()),
                "bytes": self._bytes,
                "by_status": {str(k): v for k, v in sorted(self._status.items())},
                "open_connections": self._open,
            }


class ReleaseServer:
    """A threaded HTTP server for one repository directory (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit_bps: int | None = None,
        repository: Any = None,
        resign_interval_s: float = 60.0,
    ) -> None:
        self._httpd = _Server((host, port), Path(root), rate_limit_bps)
        self.repository = repository
        self.resign_interval_s = resign_interval_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def root(self) -> Path:
        """The directory served (switchable while serving, e.g. to flip between two copies)."""
        return self._httpd.root

    @root.setter
    def root(self, path: str | Path) -> None:
        self._httpd.root = Path(path)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        return f"http://{host if isinstance(host, str) else host.decode()}:{self.port}"

    @property
    def rate_limit_bps(self) -> int | None:
        return self._httpd.rate_limit_bps

    @rate_limit_bps.setter
    def rate_limit_bps(self, value: int | None) -> None:
        self._httpd.rate_limit_bps = value

    def stats(self) -> dict[str, Any]:
        return self._httpd.stats()

    def start(self) -> ReleaseServer:
        t = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="release-http", daemon=True
        )
        t.start()
        self._threads.append(t)
        w = threading.Thread(target=self._watchdog, name="release-http-watchdog", daemon=True)
        w.start()
        self._threads.append(w)
        if self.repository is not None and self.resign_interval_s > 0:
            r = threading.Thread(target=self._resign_loop, name="release-resign", daemon=True)
            r.start()
            self._threads.append(r)
        return self

    def _watchdog(self) -> None:
        """Close connections that made no progress within the idle timeout (slow drips included)."""
        while not self._stop.wait(0.5):
            n = self._httpd.close_stalled()
            if n:
                log.info("closed %d stalled connection(s)", n)

    def _resign_loop(self) -> None:
        """Keep the online metadata fresh: re-sign what has used half its lifetime."""
        while not self._stop.wait(self.resign_interval_s):
            try:
                done = self.repository.refresh()
                if done:
                    log.info("re-signed %s", ", ".join(done))
            except Exception:  # noqa: BLE001 - a failed re-sign is logged and retried next interval
                log.exception("re-signing the online metadata failed")

    def stop(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> ReleaseServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve a repository in the foreground until interrupted."""
    ap = argparse.ArgumentParser(description="serve a release repository over HTTP")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--rate-limit", type=int, default=None, help="bytes per second per response")
    ap.add_argument(
        "--resign-interval", type=float, default=60.0, help="seconds between re-sign checks (0: off)"
    )
    ap.add_argument("--no-resign", action="store_true", help="serve only (e.g. a copy without keys)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    repo = None
    if not a.no_resign and Path(a.repo, "repository.json").exists():
        from trainer.release.repository import ReleaseRepository

        repo = ReleaseRepository(a.repo)
    server = ReleaseServer(
        a.repo,
        host=a.host,
        port=a.port,
        rate_limit_bps=a.rate_limit,
        repository=repo,
        resign_interval_s=a.resign_interval,
    ).start()
    print(f"serving {os.path.abspath(a.repo)} at {server.url} (metadata/, targets/)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
