"""Run a private mosquitto broker process with a generated config (plain, TLS, ACL).

Used by the tests (one broker per test session, or per test when it is killed and restarted), by the
demo and by benchmarks. Persistence is on by default so that QoS 1 sessions survive a restart, as
they do on a production broker.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (Debian installs it in /usr/sbin, often not on PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when the process that started it dies (no orphan brokers
    after a killed test run or demo); a no-op where prctl is unavailable."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class BrokerTLS:
    """Server-side TLS files; ``require_certificate`` turns on mutual TLS."""

    ca: Path
    cert: Path
    key: Path
    require_certificate: bool = False
    use_identity_as_username: bool = False


class MosquittoBroker:
    """One mosquitto process listening on 127.0.0.1 on a free (or given) port."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        port: int | None = None,
        tls: BrokerTLS | None = None,
        acl_file: str | Path | None = None,
        persistence: bool = True,
        allow_anonymous: bool = True,
        extra_conf: str = "",
        binary: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self.acl_file = acl_file
        self.persistence = persistence
        self.allow_anonymous = allow_anonymous
        self.extra_conf = extra_conf
        self.binary = binary or find_mosquitto()
        if not self.binary:
            raise FileNotFoundError("mosquitto binary not found (apt-get install mosquitto)")
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        lines = [f"listener {self.port} 127.0.0.1", "max_queued_messages 100000", "max_inflight_messages 100"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Started as root, mosquitto switches to the "mosquitto" user and then cannot write its
            # persistence file or log in our root-owned workdir; "root" keeps the current user.
            lines.append("user root")
        if self.tls:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
            if self.tls.require_certificate:
                lines.append("require_certificate true")
            if self.tls.use_identity_as_username:
                lines.append("use_identity_as_username true")
        lines.append(f"allow_anonymous {'true' if self.allow_anonymous else 'false'}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        lines += [f"log_dest file {self.log_path}", "log_type error", "log_type warning", "log_type notice"]
        if self.extra_conf:
            lines.append(self.extra_conf)
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        self.conf_path.write_text(self.config_text())
        self.proc = subprocess.Popen(
            [str(self.binary), "-c", str(self.conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.log_path.read_text() if self.log_path.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}{log[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on port {self.port} within {timeout} s")

    def stop(self, kill: bool = False) -> None:
        """Stop the broker: SIGTERM (it saves persistence) or SIGKILL (a crash)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self, down_seconds: float = 0.0, kill: bool = False) -> None:
        self.stop(kill=kill)
        if down_seconds:
            time.sleep(down_seconds)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
