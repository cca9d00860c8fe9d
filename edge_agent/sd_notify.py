"""systemd's service notifications (``man sd_notify``) without libsystemd: READY, STATUS, WATCHDOG, STOPPING.

A unit with ``Type=notify`` hands its process ``$NOTIFY_SOCKET``, an AF_UNIX datagram socket (a path, or
an abstract name when it starts with ``@``); each datagram is newline-separated ``KEY=VALUE`` lines.
With ``WatchdogSec=`` it also sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process meant): the
service must send ``WATCHDOG=1`` within that interval or systemd kills and restarts it. Pinging at half
the interval, as sd_watchdog_enabled(3) advises, leaves the other half for a late tick.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the agent, the trainer service and
the console call it unconditionally. A failed send is logged, never raised: a notification must not
take the service down. The deploy units are in deploy/systemd/ (its README says what counts as alive).

    notifier = Notifier()
    notifier.ready("serving")
    while running:
        work()
        notifier.ping("12.5 fps")   # WATCHDOG=1 at most every half interval
    notifier.stopping()
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | None:
    """The address to send to for ``$NOTIFY_SOCKET`` = ``value``: a path, an abstract name (``@`` becomes
    the leading NUL), or None when unset or not an AF_UNIX address (then notifications are off)."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning(
        "NOTIFY_SOCKET=%r is neither an absolute path nor an abstract name (@...): "
        "systemd notifications are off",
        value,
    )
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds systemd waits for ``WATCHDOG=1`` from process ``pid``; None when no watchdog is asked of it
    (``$WATCHDOG_USEC`` unset, or ``$WATCHDOG_PID`` names another process, e.g. a parent whose
    environment a child inherited)."""
    usec, owner = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if owner:
        if not owner.isdigit():
            log.warning("WATCHDOG_PID=%r is not a process id: the watchdog is off", owner)
            return None
        if int(owner) != pid:
            return None
    if not usec.isdigit() or int(usec) == 0:
        log.warning("WATCHDOG_USEC=%r is not a positive number of microseconds: the watchdog is off", usec)
        return None
    return int(usec) / 1e6


def _clean(value: str) -> str:
    """One line: a newline in a STATUS text would start another assignment."""
    return " ".join(value.split())


class Notifier:
    """Sends this process's notifications to systemd (a no-op when it was not started by systemd)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """``environ``: the environment to read (default ``os.environ``; tests pass their own)."""
        env = os.environ if environ is None else environ
        self.address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = watchdog_interval(env, os.getpid()) if self.address else None
        """The watchdog interval in seconds, None when systemd does not watch this process."""
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._last_ping = -math.inf
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if it was sent."""
        if self.address is None or not assignments:
            return False
        data = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
            except OSError as exc:
                # systemd gone, or a socket nobody reads: say it once, then keep serving.
                (log.debug if self._failed else log.warning)(
                    "systemd notification to %r failed: %s", self.address.replace("\0", "@"), exc
                )
                self._failed = True
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is done (systemd starts the units ordered after this one)."""
        return self.notify("READY=1", *self._status(status))

    def status(self, text: str) -> bool:
        """STATUS=: one line that ``systemctl status`` shows."""
        return self.notify(*self._status(text))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutting down. With a watchdog, one last WATCHDOG=1 too: systemd keeps the watchdog
        armed while a service stops, and the shutdown then has a whole interval to flush."""
        ping = ("WATCHDOG=1",) if self.watchdog_s is not None else ()
        return self.notify("STOPPING=1", *ping, *self._status(status))

    def watchdog_due(self, now: float | None = None) -> bool:
        """True when the watchdog is on and half its interval has passed since the last ping."""
        if self.watchdog_s is None:
            return False
        t = time.monotonic() if now is None else now
        return t - self._last_ping >= self.watchdog_s / 2

    def ping(self, status: str | None = None, now: float | None = None) -> bool:
        """WATCHDOG=1 (with an optional STATUS) if one is due; True if it was sent. Call it from the loop
        whose progress it vouches for, never from a timer thread of its own."""
        t = time.monotonic() if now is None else now
        if not self.watchdog_due(t):
            return False
        self._last_ping = t
        return self.notify("WATCHDOG=1", *self._status(status))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        return (f"STATUS={_clean(text)}",) if text else ()
