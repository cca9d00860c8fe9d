"""deploy/systemd/ and the notifications behind it: every unit passes ``systemd-analyze verify`` (and one
with a missing binary fails it); the real ``edgefleet agent run``, ``trainer serve`` and ``console``
send READY=1, WATCHDOG=1 at the interval and STOPPING=1 to a notify socket the test owns; the agent's
pings stop when its frame loop is stuck (an HTTP camera that stops sending, an inference that never
returns) and go on while its source reconnects; edge_agent/sd_notify.py's protocol on its own.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_agent.backends.base import BackendOptions
from edge_agent.config import MqttSettings
from edge_agent.liveness import OPEN_GRACE_S, AgentLiveness
from edge_agent.pipeline import LoadedModel
from edge_agent.sd_notify import Notifier, socket_address, watchdog_interval
from edge_agent.sources.base import FrameSource, SourceLost
from trainer.fleet.config import ConsoleSettings
from trainer.ops.broker import MosquittoBroker, free_port
from trainer.sim.tiny import ARTIFACT, build_tiny_package

from .conftest import require
from .mqtt_helpers import wait_until
from .test_fleet_loop import _service_config

ROOT = Path(__file__).resolve().parents[1]
UNIT_DIR = ROOT / "deploy" / "systemd"
UNITS = sorted(p.name for p in UNIT_DIR.glob("*.service"))
EDGEFLEET = Path(sys.executable).with_name("edgefleet")


# -- the unit files ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    require(os.access(path, os.X_OK), "systemd-analyze (apt-get install systemd; `make test` does)")
    return path


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNIT_DIR / name)
    return parser


def _install(name: str, dest: Path, binary: Path) -> Path:
    """``name`` copied into ``dest`` with its ExecStart binary replaced by ``binary``; a template is
    installed as its instance ``cam1`` (what ``systemctl start edgefleet-agent@cam1`` loads)."""
    text = (UNIT_DIR / name).read_text()
    shipped = _unit(name)["Service"]["ExecStart"].split()[0]
    assert text.count(shipped) == 1, f"{name}: ExecStart binary {shipped} should appear once"
    path = dest / name.replace("@.", "@cam1.")
    path.write_text(text.replace(shipped, str(binary)))
    return path


def _verify(analyze: str, unit: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify's exit code and the lines it printed about ``unit`` (warnings included:
    an unknown or misspelt key is only a warning)."""
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    ours = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if unit.name in line or unit.name.replace("@cam1.", "@.") in line or str(unit.parent) in line
    ]
    return proc.returncode, ours


def test_units_exist() -> None:
    assert UNITS == ["edgefleet-agent@.service", "edgefleet-console.service", "edgefleet-trainer.service"]


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_passes_systemd_analyze_verify(name: str, systemd_analyze: str, tmp_path: Path) -> None:
    assert EDGEFLEET.is_file(), EDGEFLEET
    code, said = _verify(systemd_analyze, _install(name, tmp_path, EDGEFLEET))
    assert code == 0 and not said, said


@pytest.mark.parametrize("name", UNITS)
def test_a_unit_whose_binary_is_missing_fails_verify(name: str, systemd_analyze: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-venv" / "bin" / "edgefleet"
    code, said = _verify(systemd_analyze, _install(name, tmp_path, missing))
    assert code != 0 and any(str(missing) in line and "not executable" in line for line in said), said


def test_verify_reports_a_misspelt_key(systemd_analyze: str, tmp_path: Path) -> None:
    """The check above would miss a typo in a hardening option without reading the warnings."""
    unit = _install("edgefleet-trainer.service", tmp_path, EDGEFLEET)
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    _, said = _verify(systemd_analyze, unit)
    assert any("ProtectSytem" in line for line in said), said


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_is_watched_and_hardened(name: str) -> None:
    """Type=notify with a watchdog, restarted on failure, an unprivileged user, a read-only system with
    only its state directory writable."""
    s = _unit(name)["Service"]
    assert (s["Type"], s["NotifyAccess"], s["Restart"]) == ("notify", "main", "on-failure")
    assert s["WatchdogSec"].endswith(("s", "min")) and s["User"] == "edgefleet"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert s[key] == value, (name, key)
    assert s["StateDirectory"].split()[0] == "edgefleet" and "ReadWritePaths" not in s


def test_the_agent_template_runs_its_instance_config_and_may_use_a_camera() -> None:
    s = _unit("edgefleet-agent@.service")["Service"]
    assert s["ExecStart"].endswith("agent run --config /etc/edgefleet/agents/%i.yaml")
    assert "CAMERA=%i" in s["Environment"].split()  # firmware_configs/gateway-rtsp.yaml keys on it
    assert s["SupplementaryGroups"] == "video" and s["DeviceAllow"] == "char-video4linux rw"
    assert "PrivateDevices" not in s  # it would hide /dev/video*
    # a stalled stream is reconnected by the source after OpenCV's 30 s read timeout: that must fit
    # between two pings (half the interval apart) before systemd kills the agent
    assert int(s["WatchdogSec"].removesuffix("s")) > 2 * 30


@pytest.mark.parametrize("name", ["edgefleet-agent@.service", "edgefleet-trainer.service"])
def test_systemd_rates_the_hardening_ok(name: str, systemd_analyze: str, tmp_path: Path) -> None:
    unit = _install(name, tmp_path, EDGEFLEET)
    proc = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert m and float(m.group(1)) <= 2.5, proc.stdout[-2000:] + proc.stderr[-2000:]


# -- a notify socket the test owns -------------------------------------------------------------------
class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's: every datagram with its arrival time."""

    def __init__(self, address: str) -> None:
        self.address = address  # NOTIFY_SOCKET's value: a path, or @name (abstract)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address) or "")
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def times(self, assignment: str) -> list[float]:
        return [t for t, lines in list(self.messages) if assignment in lines]

    def statuses(self, since: float = 0.0) -> list[str]:
        return [
            line[7:]
            for t, lines in list(self.messages)
            if t >= since
            for line in lines
            if line.startswith("STATUS=")
        ]

    def wait_for(self, assignment: str, timeout: float) -> float:
        assert wait_until(lambda: bool(self.times(assignment)), timeout, 0.05), (
            f"no {assignment} within {timeout} s; got {self.messages}"
        )
        return self.times(assignment)[0]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket(f"@edgefleet-test-{uuid.uuid4().hex}")
    yield s
    s.close()


def _start(args: list[str], notify: NotifySocket, watchdog_s: float) -> subprocess.Popen[str]:
    """``edgefleet ARGS`` as systemd starts it: NOTIFY_SOCKET, WATCHDOG_USEC, and WATCHDOG_PID naming
    the process itself (the shell execs Python, keeping its pid)."""
    env = os.environ | {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}
    return subprocess.Popen(
        ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$0" "$@"', sys.executable, "-m", "edge_agent.cli", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[str], notify: NotifySocket, timeout: float = 60) -> str:
    """SIGTERM, as systemd stops a unit: STOPPING=1 must arrive and the process exit 0."""
    proc.send_signal(signal.SIGTERM)
    try:
        notify.wait_for("STOPPING=1", 30)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return err


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# -- the agent -------------------------------------------------------------------------------------
W, H = 64, 48


class StallingCamera:
    """An HTTP camera (a YUV4MPEG2 stream, 20 fps) that can stall (the connection stays open, nothing
    is sent: OpenCV's read blocks, a real stuck camera) and go away (connection closed, port shut)."""

    def __init__(self) -> None:
        self.flowing = threading.Event()
        self.flowing.set()
        self.gone = threading.Event()
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "video/x-yuv4mpeg")
                self.end_headers()
                self.wfile.write(f"YUV4MPEG2 W{W} H{H} F20:1 Ip A1:1 C420jpeg\n".encode())
                i = 0
                while not camera.gone.is_set():
                    camera.flowing.wait()
                    if camera.gone.is_set():
                        return
                    luma = bytes([(i * 7) % 256]) * (W * H)
                    self.wfile.write(b"FRAME\n" + luma + bytes([128]) * (W * H // 2))
                    self.wfile.flush()
                    i += 1
                    time.sleep(0.05)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cam.y4m"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def go_away(self) -> None:
        self.gone.set()
        self.flowing.set()
        self.server.shutdown()
        self.server.server_close()


def _agent_config(tmp_path: Path, broker_url: str, source: str, behaviour: str = "ok") -> Path:
    pkg = build_tiny_package(tmp_path / f"pkg-{behaviour}", behaviour=behaviour)  # type: ignore[arg-type]
    cfg = {
        "device_id": f"cam-sd-{behaviour}",
        "fleet": "t",
        "state_dir": str(tmp_path / "state"),
        "source": {"uri": source, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        "model": {"package": str(pkg.root), "artifact": ARTIFACT},
        "mqtt": {"url": broker_url},
        "telemetry": {"window_seconds": 2},
        "spool": {"flush_timeout_s": 1},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_agent_pings_from_its_frame_loop_stops_when_the_camera_stalls_and_goes_on_while_it_reconnects(
    tmp_path: Path, broker: MosquittoBroker, notify_socket: NotifySocket
) -> None:
    """The real agent with WatchdogSec=2s: READY=1, then WATCHDOG=1 every ~1 s while frames flow; a camera
    that stops sending (connection open) stops them for longer than the interval (systemd would restart
    it); a camera that is gone (the source reconnects with backoff) has them going on; STOPPING=1."""
    camera = StallingCamera()
    config = _agent_config(tmp_path, broker.url, camera.url)
    proc = _start(["agent", "run", "--config", str(config)], notify_socket, watchdog_s=2.0)
    try:
        ready = notify_socket.wait_for("READY=1", 60)
        assert wait_until(lambda: len(notify_socket.times("WATCHDOG=1")) >= 4, 15), notify_socket.messages
        flowing = notify_socket.times("WATCHDOG=1")
        assert all(0.9 <= g < 2.0 for g in _gaps(flowing)), _gaps(flowing)  # half the interval apart
        assert any(
            re.search(r"colour 1\.0\.0 \(onnx-fp32\): [0-9.]+ fps", s) for s in notify_socket.statuses()
        )

        camera.flowing.clear()  # the stream stalls: OpenCV's read blocks, no frame reaches the loop
        stalled_at = time.monotonic()
        time.sleep(4.0)
        assert not [t for t in notify_socket.times("WATCHDOG=1") if t > stalled_at + 1.0]

        gone_at = time.monotonic()
        camera.go_away()  # connection closed, port shut: the source is down and reconnecting
        assert wait_until(lambda: len([t for t in notify_socket.times("WATCHDOG=1") if t > gone_at]) >= 3, 10)
        last_before = max(t for t in notify_socket.times("WATCHDOG=1") if t < gone_at)
        first_after = min(t for t in notify_socket.times("WATCHDOG=1") if t > gone_at)
        assert first_after - last_before > 2.0  # no ping for longer than WatchdogSec while stalled
        assert any("down" in s and "reconnecting" in s for s in notify_socket.statuses(since=gone_at))
    finally:
        err = _stop(proc, notify_socket)
    assert ready < flowing[0] and "Traceback" not in err, err[-3000:]


def test_agent_whose_inference_hangs_never_pings_the_watchdog(
    tmp_path: Path, broker: MosquittoBroker, notify_socket: NotifySocket
) -> None:
    """A live camera keeps capturing while the inference never returns (the tiny model's endless Loop):
    the source looks fine, but no frame is inferred, so there is no WATCHDOG=1 at all; SIGTERM still
    ends the loop with STOPPING=1."""
    config = _agent_config(tmp_path, broker.url, f"synthetic:?fps=20&width={W}&height={H}", behaviour="hang")
    proc = _start(["agent", "run", "--config", str(config)], notify_socket, watchdog_s=1.0)
    try:
        ready = notify_socket.wait_for("READY=1", 60)
        time.sleep(3.0)
        assert not notify_socket.times("WATCHDOG=1"), notify_socket.messages
        proc.send_signal(signal.SIGTERM)
        assert notify_socket.wait_for("STOPPING=1", 30) > ready
    finally:
        # the hung inference thread keeps a core busy until the process goes: do not wait for it long
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


class BlockingCamera(FrameSource):
    """A camera whose first open fails and whose second never returns (a driver stuck in open)."""

    def __init__(self) -> None:
        super().__init__("camera:9", reconnect_min_s=0.01, reconnect_max_s=0.01)
        self.opens = 0
        self.release_open = threading.Event()

    def _open(self) -> None:
        self.opens += 1
        if self.opens == 1:
            raise SourceLost("cannot open camera:9")
        self.release_open.wait()
        raise SourceLost("closed")

    def _grab(self) -> np.ndarray | None:
        return None


def test_a_reconnect_counts_as_alive_only_while_its_attempts_keep_failing(tmp_path: Path) -> None:
    """Down and retrying is alive; an open attempt that never ends is not, past the backoff's bound."""
    model = LoadedModel.load(build_tiny_package(tmp_path / "pkg"), ARTIFACT, BackendOptions())
    sock = NotifySocket(str(tmp_path / "notify"))
    camera = BlockingCamera()
    camera.start()
    try:
        assert wait_until(lambda: camera.opens == 2, 5)
        notifier = Notifier({"NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": "1000000"})
        liveness = AgentLiveness(notifier, camera, lambda: model, reconnect_max_s=0.01)
        liveness.tick(0, 100.0)  # down, an attempt just failed: alive
        assert wait_until(lambda: len(sock.times("WATCHDOG=1")) == 1, 2)
        liveness.tick(0, 100.0 + OPEN_GRACE_S + 1)  # the second open has not returned since
        time.sleep(0.3)
        assert len(sock.times("WATCHDOG=1")) == 1
        assert (
            sock.statuses()
            == [
                "colour 1.0.0 (onnx-fp32): source camera:9 down (SourceLost: cannot open camera:9), reconnecting"
            ]
            * 2
        )  # with the ping, then alone when the status was due
    finally:
        camera.release_open.set()
        camera.close()
        sock.close()


# -- the trainer service and the console ---------------------------------------------------------------
def _trainer_yaml(tmp_path: Path, broker: MosquittoBroker, fleet: str, console: bool = False) -> Path:
    cfg = _service_config(tmp_path, broker.url, base_data="builtin:shapes")
    cfg.fleet = fleet
    cfg.mqtt = MqttSettings(url=broker.url, client_id=f"trainer-{fleet}")
    if console:
        cfg.console = ConsoleSettings(port=free_port())
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    return path


def test_trainer_serve_is_ready_and_pings_from_its_service_loop(
    tmp_path: Path, broker: MosquittoBroker, notify_socket: NotifySocket
) -> None:
    config = _trainer_yaml(tmp_path, broker, "sd-serve")
    proc = _start(["trainer", "serve", "--config", str(config)], notify_socket, watchdog_s=2.0)
    try:
        ready = notify_socket.wait_for("READY=1", 60)
        assert wait_until(lambda: len(notify_socket.times("WATCHDOG=1")) >= 4, 15), notify_socket.messages
        pings = notify_socket.times("WATCHDOG=1")
        assert ready < pings[0] and all(0.9 <= g < 2.0 for g in _gaps(pings)), _gaps(pings)
        assert any("fleet sd-serve: no champion yet" in s for s in notify_socket.statuses())
    finally:
        _stop(proc, notify_socket)


def test_console_is_ready_once_listening_and_pings_while_healthz_answers(
    tmp_path: Path, broker: MosquittoBroker, notify_socket: NotifySocket
) -> None:
    config = _trainer_yaml(tmp_path, broker, "sd-console", console=True)
    proc = _start(["console", "--config", str(config)], notify_socket, watchdog_s=2.0)
    try:
        notify_socket.wait_for("READY=1", 60)
        [url] = {m.group(1) for s in notify_socket.statuses() if (m := re.match(r"console at (\S+)$", s))}
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5):
            pass  # READY=1 came once it listens
        assert wait_until(lambda: len(notify_socket.times("WATCHDOG=1")) >= 4, 15), notify_socket.messages
        assert all(0.9 <= g < 2.0 for g in _gaps(notify_socket.times("WATCHDOG=1")))
        assert any(s.endswith("/healthz answers") for s in notify_socket.statuses())
    finally:
        _stop(proc, notify_socket)


# -- edge_agent/sd_notify.py -------------------------------------------------------------------------
def test_without_notify_socket_every_call_is_a_no_op() -> None:
    n = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_s is None
    assert not n.ready("x") and not n.status("x") and not n.ping() and not n.stopping()


def test_an_abstract_socket_gets_one_datagram_per_notification() -> None:
    sock = NotifySocket(f"@edgefleet-unit-{uuid.uuid4().hex}")
    try:
        n = Notifier({"NOTIFY_SOCKET": sock.address})
        assert n.ready("loading done\nREADY=1") and n.status("serving") and n.stopping()
        assert wait_until(lambda: len(sock.messages) == 3, 2)
        # a newline in a status must not smuggle in another assignment
        assert [lines for _, lines in sock.messages] == [
            ["READY=1", "STATUS=loading done READY=1"],
            ["STATUS=serving"],
            ["STOPPING=1"],  # no watchdog asked: no WATCHDOG=1 with it
        ]
    finally:
        sock.close()


def test_watchdog_pings_at_half_the_interval_from_a_path_socket(tmp_path: Path) -> None:
    sock = NotifySocket(str(tmp_path / "notify"))
    try:
        n = Notifier(
            {"NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
        )
        assert n.watchdog_s == 2.0
        sent = [n.ping("a", now=t) for t in (10.0, 10.5, 10.99, 11.0, 11.5, 12.2)]
        assert sent == [True, False, False, True, False, True]
        assert n.stopping()
        assert wait_until(lambda: len(sock.messages) == 4, 2)
        assert sock.messages[0][1] == ["WATCHDOG=1", "STATUS=a"]
        assert sock.messages[-1][1] == ["STOPPING=1", "WATCHDOG=1"]  # the stop gets a whole interval
    finally:
        sock.close()


def test_a_watchdog_meant_for_another_process_is_ignored(tmp_path: Path) -> None:
    sock = NotifySocket(str(tmp_path / "notify"))
    try:
        env = {"NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        n = Notifier(env)
        assert n.enabled and n.watchdog_s is None  # e.g. a child that inherited its parent's environment
        assert not n.ping() and not n.watchdog_due(1e9)
        assert n.stopping()
        assert wait_until(lambda: len(sock.messages) == 1, 2)
        assert sock.messages[0][1] == ["STOPPING=1"]
    finally:
        sock.close()


def test_bad_environment_values_turn_notifications_off_with_a_warning(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    assert socket_address("run/notify") is None and "neither an absolute path" in caplog.text
    assert socket_address("@x") == "\0x" and socket_address("/run/x") == "/run/x"
    assert watchdog_interval({"WATCHDOG_USEC": "30s"}, 1) is None and "WATCHDOG_USEC='30s'" in caplog.text
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 1) is None
    assert watchdog_interval({"WATCHDOG_USEC": "500", "WATCHDOG_PID": "x"}, 1) is None
    assert watchdog_interval({"WATCHDOG_USEC": "500", "WATCHDOG_PID": "7"}, 7) == 0.0005
    assert watchdog_interval({}, 7) is None


def test_a_socket_nobody_listens_on_is_reported_not_raised(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled and not n.ready() and not n.status("x")
    assert caplog.text.count("systemd notification to") == 1  # said once, then quiet
    n.close()
