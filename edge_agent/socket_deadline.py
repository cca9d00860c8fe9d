"""A total time limit for one network exchange: when it passes, the exchange's sockets are shut down.

Socket timeouts bound each read, not the whole exchange: a peer sending a byte just inside the timeout
keeps a connect, a TLS handshake, the headers or a body going for ever. A timer that shuts the sockets
down makes a blocked read return at once. The updater's fetches and the trainer's webhook deliveries both
use it.

    with SocketDeadline(5.0) as deadline:
        sock = deadline.watch(socket.create_connection(addr))
        ...                                   # past 5 s, reads on sock fail; deadline.expired is True
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class SocketDeadline:
    """Started on creation; :meth:`close` (or leaving the ``with`` block) ends it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self._expired = False
        self._done = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def expired(self) -> bool:
        """Whether the sockets were cut (the timer fired or :meth:`expire` was called)."""
        return self._expired

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.ends - time.monotonic()

    def passed(self) -> bool:
        """Whether the deadline has passed (the timer may not have fired yet)."""
        return self._expired or self.remaining() <= 0

    def watch(self, sock: socket.socket) -> socket.socket:
        """Cut ``sock`` at the deadline (at once if it has passed) and return it. A duplicate of the
        descriptor is kept: TLS wrapping detaches the original object, shutting down any descriptor of a
        connection ends it, and a held descriptor cannot be reused for another socket."""
        if sock.fileno() < 0:
            return sock
        dup = sock.dup()
        with self._lock:
            if self._done:
                dup.close()
                return sock
            self._socks.append(dup)
            if self.passed():
                _shutdown(dup)
        return sock

    def expire(self) -> None:
        """End the exchange now (the timer, or its owner stopping)."""
        with self._lock:  # cut under the lock: close() closes these, and a closed fd may be reused
            if self._done:
                return
            self._expired = True
            for s in self._socks:
                _shutdown(s)

    def close(self) -> None:
        """The exchange is over: stop the timer and let go of the duplicates (the connection itself stays
        usable, e.g. for a pool to reuse)."""
        self._timer.cancel()
        with self._lock:
            self._done = True
            socks, self._socks = self._socks, []
        for s in socks:
            s.close()

    def __enter__(self) -> SocketDeadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shutdown(sock: socket.socket) -> None:
    """Shut a connection down both ways; a blocked read on it returns at once (closed: nothing to do)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
