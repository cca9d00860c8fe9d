"""The updater's pure pieces: state transitions and invariants, boot choice, health window, compatibility,
and the archive format (including hostile archives)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from edge_agent.package import load_package
from edge_agent.protocol import FrameCounts, LatencySummary, ModelRef, TelemetryWindow
from edge_agent.updater.archive import ArchiveError, pack_package, unpack_archive
from edge_agent.updater.boot import select_boot
from edge_agent.updater.compat import DeviceProfile, check_compatible, version_tuple
from edge_agent.updater.errors import UpdateRejected
from edge_agent.updater.health import HealthPolicy, HealthWindow
from edge_agent.updater.release_info import ReleaseInfo, ReleaseInfoError, parse_release_info, preprocess_text
from edge_agent.updater.state import Installed, UpdateStateData
from edge_agent.updater.store import UpdateStore
from trainer.sim.tiny import build_tiny_package

SHA = "ab" * 32


def _staged(state: UpdateStateData, release: int, sha: str = SHA) -> None:
    slot = state.staging_slot()
    state.begin_staging(
        slot,
        target="canary/f/m.tar",
        target_sha256=sha,
        release=release,
        package_sha256="cd" * 32,
        model="m",
        version=f"{release}.0",
    )
    state.mark_staged()


def _trial(state: UpdateStateData, now: float) -> Installed:
    """Verify (counting the attempt) and start the trial of the staged release."""
    state.begin_verifying()
    return state.start_trial(now)


def test_state_lifecycle_keeps_the_committed_slot_untouched() -> None:
    st = UpdateStateData()
    st.ensure_committed(Installed(slot="factory", package_sha256="00" * 32, model="m", version="1"))
    assert st.staging_slot() == "a"
    _staged(st, 5)
    trial = _trial(st, 100.0)
    assert trial.slot == "a" and st.max_release == 5 and st.attempts[SHA] == 1
    assert st.problems() == []
    st.commit()
    assert st.committed and st.committed.slot == "a" and st.previous and st.previous.slot == "factory"
    assert st.staging_slot() == "b"  # never the committed slot
    _staged(st, 6, "ef" * 32)
    _trial(st, 101.0)
    st.rollback("health_confidence", 102.0)
    assert st.committed.slot == "a" and st.trial is None and st.is_rejected("ef" * 32)
    assert st.max_release == 6  # a rolled-back release still raises the downgrade floor
    # The next release goes to b again; a then-fallback in b would be forgotten first.
    st.previous = Installed(slot="b", package_sha256="11" * 32, model="m", version="0")
    _staged(st, 7, "12" * 32)
    assert st.staging and st.staging.slot == "b" and st.previous is None
    assert st.problems() == []


def test_interrupted_trial_is_resumed_once_then_given_up() -> None:
    st = UpdateStateData()
    st.ensure_committed(Installed(slot="factory", package_sha256="00" * 32, model="m", version="1"))
    _staged(st, 3)
    _trial(st, 1.0)
    t = st.abandon_interrupted(max_attempts=2, now=2.0)
    assert t is not None and st.trial is None and st.committed.slot == "factory"
    assert st.staging and st.staging.phase == "staged" and not st.is_rejected(SHA)  # kept for a cheap retry
    _trial(st, 3.0)
    st.abandon_interrupted(max_attempts=2, now=4.0)
    assert st.is_rejected(SHA) and st.rejected[SHA].reason == "interrupted" and st.staging is None


def test_an_agent_killed_while_verifying_counts_an_attempt() -> None:
    """A model that crashes the agent while it is loaded or self-tested used to be retried on every
    start (a crash loop): the attempt is counted before verifying."""
    st = UpdateStateData()
    st.ensure_committed(Installed(slot="factory", package_sha256="00" * 32, model="m", version="1"))
    _staged(st, 3)
    st.begin_verifying()  # ... and the agent dies here
    assert st.abandon_interrupted(max_attempts=2, now=1.0) is None
    assert st.staging and st.staging.phase == "staged" and st.attempts[SHA] == 1  # one more try
    st.begin_verifying()  # dies again
    st.abandon_interrupted(max_attempts=2, now=2.0)
    assert st.is_rejected(SHA) and st.rejected[SHA].reason == "interrupted" and st.staging is None


def test_invariant_violations_are_named() -> None:
    st = UpdateStateData(
        committed=Installed(slot="a", package_sha256="00" * 32, model="m", version="1", release=4)
    )
    assert "committed release 4 above max_release 0" in st.problems()
    st.max_release = 4
    st.trial = Installed(slot="a", package_sha256="11" * 32, model="m", version="2", release=4)
    assert "trial uses the committed slot a" in st.problems()


def test_boot_prefers_committed_then_previous_then_factory(tmp_path: Path) -> None:
    factory = build_tiny_package(tmp_path / "factory", version="1.0.0")
    store = UpdateStore(tmp_path / "update")
    boot = select_boot(store, factory.root)
    assert boot.installed.slot == "factory" and boot.package.sha256 == factory.sha256
    v2 = build_tiny_package(store.slot_dir("a"), version="2.0.0")
    v3 = build_tiny_package(store.slot_dir("b"), version="3.0.0")
    st = store.load()
    st.previous = st.committed
    st.committed = Installed(slot="a", package_sha256=v2.sha256, model="colour", version="2.0.0", release=1)
    st.trial = Installed(
        slot="b",
        package_sha256=v3.sha256,
        model="colour",
        version="3.0.0",
        release=2,
        target="canary/f/colour.tar",
        target_sha256=SHA,
        started=1.0,
    )
    st.max_release = 2
    store.save(st)
    boot = select_boot(store, factory.root)  # power cut during the trial of v3
    assert boot.package.sha256 == v2.sha256 and boot.interrupted and boot.interrupted.version == "3.0.0"
    assert store.load().trial is None
    (store.slot_dir("a") / "model.onnx").write_bytes(b"bit rot")  # the committed slot is corrupted
    boot = select_boot(store, factory.root)
    assert boot.package.sha256 == factory.sha256 and boot.fallbacks and "slot a" in boot.fallbacks[0]
    assert store.load().committed.slot == "factory"
    store.state_path.write_text("{torn")
    assert select_boot(store, factory.root).installed.slot == "factory"


def _window(
    seq: int,
    start: float,
    *,
    inferred: int = 10,
    conf: float = 0.9,
    p50: float = 1.0,
    events: dict[str, int] | None = None,
) -> TelemetryWindow:
    return TelemetryWindow(
        fleet="f",
        device="d",
        session=1,
        seq=seq,
        start=start,
        end=start + 1,
        model=ModelRef(name="m", version="2", sha256="00" * 32),
        agent_version="x",
        frames=FrameCounts(captured=inferred, inferred=inferred),
        events=events or {},
        latency_ms={"inference": LatencySummary(count=inferred, p50=p50)} if inferred else {},
        confidence_mean=conf if inferred else None,
    )


def test_health_window_commits_after_n_good_windows_and_ignores_windows_before_the_swap() -> None:
    hw = HealthWindow(
        HealthPolicy(windows=2, latency_budget_ms=50, reference_confidence=0.9), swapped_at=10.0
    )
    assert hw.add(_window(0, 5.0, conf=0.01)).decision == "pending"  # before the swap: the old model's
    assert hw.add(_window(1, 10.5, inferred=0)).decision == "pending"  # no frames: inconclusive
    assert hw.add(_window(2, 11.0)).decision == "pending"
    v = hw.add(_window(3, 12.0))
    assert v.decision == "commit" and v.windows == 2


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"events": {"non_finite_output": 3}}, "health_failures"),
        ({"inferred": 0, "events": {"inference_error": 5}}, "health_failures"),  # nothing inferred at all
        ({"p50": 80.0}, "health_latency"),
        ({"conf": 0.34}, "health_confidence"),
    ],
)
def test_health_window_rolls_back_on_the_first_bad_window(kw: dict, reason: str) -> None:
    hw = HealthWindow(HealthPolicy(windows=3, latency_budget_ms=50, reference_confidence=0.9), swapped_at=0.0)
    assert hw.add(_window(0, 1.0)).decision == "pending"
    v = hw.add(_window(1, 2.0, **kw))
    assert v.decision == "rollback" and v.reason == reason
    assert hw.add(_window(2, 3.0)).decision == "rollback"  # final


def test_corrupt_frames_from_the_camera_are_not_the_models_fault() -> None:
    hw = HealthWindow(HealthPolicy(windows=1), swapped_at=0.0)
    assert hw.add(_window(0, 1.0, events={"corrupt_frames": 4, "bad_frame": 4})).decision == "commit"


def _info(**kw) -> ReleaseInfo:
    base = dict(
        fleet="shop",
        channel="canary",
        model="colour",
        version="2.0.0",
        release=3,
        package_sha256=SHA,
        formats={"onnx-int8": "onnxruntime"},
        preprocess=preprocess_text({"size": [16, 16]}),
    )
    return ReleaseInfo(**(base | kw))


def _device(**kw) -> DeviceProfile:
    base = dict(
        fleet="shop",
        model="colour",
        agent_version="0.3.1",
        runtimes=frozenset({"onnxruntime"}),
        hardware=frozenset({"x86_64"}),
        max_target_bytes=1000,
    )
    return DeviceProfile(**(base | kw))


@pytest.mark.parametrize(
    ("info", "device", "length", "reason"),
    [
        ({"fleet": "other"}, {}, 10, "wrong_fleet"),
        ({"model": "faces"}, {}, 10, "wrong_model"),
        ({}, {}, 1001, "too_large"),
        ({"min_agent_version": "0.10"}, {}, 10, "agent_too_old"),
        ({"formats": {"tflite-int8": "litert"}}, {}, 10, "no_runnable_format"),
        ({}, {"artifact": "tflite-int8"}, 10, "no_runnable_format"),
        (
            {"preprocess": preprocess_text({"size": [16, 16], "resize": "fisheye"})},
            {},
            10,
            "preprocess_unsupported",
        ),
        ({"preprocess": preprocess_text({"gamma": 2.2})}, {}, 10, "preprocess_unsupported"),
        ({"hardware": ["aarch64"]}, {}, 10, "hardware_mismatch"),
        ({"package_format": "edgefleet.model/2"}, {}, 10, "package_format"),
    ],
)
def test_incompatible_releases_are_refused_before_download(
    info: dict, device: dict, length: int, reason: str
) -> None:
    check_compatible(_info(), 10, _device())  # the baseline is compatible
    with pytest.raises(UpdateRejected) as exc:
        check_compatible(_info(**info), length, _device(**device))
    assert exc.value.reason == reason and exc.value.permanent


def test_version_ordering_is_numeric() -> None:
    assert version_tuple("0.10.0") > version_tuple("0.9.9") and version_tuple("1.2rc1") == (1, 2)


def test_release_info_in_target_custom() -> None:
    info = _info()
    assert parse_release_info({"edgefleet": info.model_dump(mode="json")}) == info
    with pytest.raises(ReleaseInfoError, match="no custom.edgefleet"):
        parse_release_info(None)
    with pytest.raises(ReleaseInfoError, match="release"):
        parse_release_info({"edgefleet": info.model_dump(mode="json") | {"release": 0}})


def test_archive_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    pkg = build_tiny_package(tmp_path / "p", version="1.0.0")
    (tmp_path / "p" / "stray.txt").write_text("not listed in model.json: not shipped")
    a, b = pack_package(pkg.root, tmp_path / "a.tar"), pack_package(pkg.root, tmp_path / "b.tar")
    assert a.read_bytes() == b.read_bytes()
    names = unpack_archive(a, tmp_path / "out", max_bytes=10**7)
    assert "stray.txt" not in names and load_package(tmp_path / "out").sha256 == pkg.sha256


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w") as t:
        for info, data in members:
            info.size = len(data)
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tarfile.TarInfo("../escape.json"), "unsafe member name"),
        (tarfile.TarInfo("/etc/passwd"), "unsafe member name"),
        (tarfile.TarInfo("a/./../../b"), "unsafe member name"),
    ],
)
def test_hostile_archive_names_are_refused(tmp_path: Path, member: tarfile.TarInfo, message: str) -> None:
    arc = _tar(tmp_path / "x.tar", [(tarfile.TarInfo("model.json"), b"{}"), (member, b"x")])
    with pytest.raises(ArchiveError, match=message):
        unpack_archive(arc, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "escape.json").exists()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("golden/red.png", "golden//red.png"),
        ("model.json.bak", "./model.json.bak"),
        ("golden", "golden/red.png"),  # a file, then a child of it
    ],
)
def test_one_file_under_two_spellings_is_an_archive_error(tmp_path: Path, first: str, second: str) -> None:
    """These raised an unhandled FileExistsError: no event, staging stuck at writing on every hint."""
    members = [(tarfile.TarInfo(n), b"x") for n in ("model.json", first, second)]
    with pytest.raises(ArchiveError, match="unsafe member name|clashes with another member"):
        unpack_archive(_tar(tmp_path / "dup.tar", members), tmp_path / "out", max_bytes=1000)


def test_links_devices_and_oversize_archives_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("model.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ArchiveError, match="not a regular file"):
        unpack_archive(_tar(tmp_path / "l.tar", [(link, b"")]), tmp_path / "o1", max_bytes=1000)
    with pytest.raises(ArchiveError, match="exceeds"):
        unpack_archive(
            _tar(tmp_path / "big.tar", [(tarfile.TarInfo("model.json"), b"x" * 2000)]),
            tmp_path / "o2",
            max_bytes=1000,
        )
    many = [(tarfile.TarInfo(f"f{i}"), b"") for i in range(5)]
    with pytest.raises(ArchiveError, match="more than 3 files"):
        unpack_archive(_tar(tmp_path / "many.tar", many), tmp_path / "o3", max_bytes=1000, max_files=3)
    (tmp_path / "junk.tar").write_bytes(json.dumps({"not": "a tar"}).encode() * 100)
    with pytest.raises(ArchiveError):
        unpack_archive(tmp_path / "junk.tar", tmp_path / "o4", max_bytes=10**6)


@pytest.mark.parametrize("model", ["ReleaseHint", "UpdateEvent"])
def test_update_messages_are_documented(model: str) -> None:
    from edge_agent import protocol

    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    for name in getattr(protocol, model).model_fields:
        assert f"`{name}`" in doc, f"{model}.{name} is not documented in docs/protocol.md"


def test_every_reason_code_is_documented() -> None:
    import re

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "protocol.md").read_text()
    code = "".join(p.read_text() for p in (root / "edge_agent" / "updater").glob("*.py"))
    reasons = set(re.findall(r'(?:UpdateRejected\(|no\()\s*"([a-z_]+)"', code)) | set(
        re.findall(r'return "(health_[a-z]+)"', code)
    )
    assert len(reasons) > 15
    missing = sorted(r for r in reasons if f"`{r}`" not in doc)
    assert not missing, f"reason codes missing from docs/protocol.md: {missing}"


def test_update_config_section(tmp_path: Path) -> None:
    from edge_agent.config import load_config
    from edge_agent.errors import ConfigError

    cfg_file = tmp_path / "agent.yaml"
    base = "device_id: cam\nsource: {uri: 'synthetic:'}\nmodel: {package: pkg}\n"
    cfg_file.write_text(
        base + "update: {repository: 'http://trainer:8080', root: keys/root.json, channel: canary}\n"
    )
    cfg = load_config(cfg_file)
    assert (
        cfg.update is not None and cfg.update.root == tmp_path / "keys" / "root.json"
    )  # relative to the file
    assert (cfg.update.health_windows, cfg.update.poll_seconds, cfg.update.channel) == (3, 3600.0, "canary")
    assert load_config(_write(tmp_path / "none.yaml", base)).update is None  # no section: never updates
    with pytest.raises(ConfigError, match="update.repository: must look like http"):
        load_config(_write(tmp_path / "bad.yaml", base + "update: {repository: 'ftp://x', root: r.json}\n"))
    with pytest.raises(ConfigError, match="update.channel"):
        load_config(
            _write(
                tmp_path / "bad2.yaml",
                base + "update: {repository: 'http://x', root: r.json, channel: 'a/#'}\n",
            )
        )


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("phase", "call"),
    [("body", "download"), ("headers", "download"), ("headers", "metadata")],
)
def test_a_server_dripping_bytes_cannot_hang_a_fetch(tmp_path: Path, phase: str, call: str) -> None:
    """One byte every half second never trips the read timeout; the whole-fetch deadline ends it as too
    slow (the updater then counts the repository as unreachable and retries later). The deadline starts
    before the request: a server dripping its response headers for 6 s (then answering in full) is cut
    off at 2 s too, for a target download and for a metadata fetch through python-tuf."""
    import socket
    import threading
    import time

    from tuf.api import exceptions as tuf_exc

    from edge_agent.updater.fetcher import HttpFetcher

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def drip(data: bytes, seconds: float) -> bool:
        """Send ``data`` a byte every half second for at most ``seconds``; False once cut off."""
        t_end = time.monotonic() + seconds
        for byte in data:
            if stop.is_set() or time.monotonic() > t_end:
                break
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return False
            time.sleep(0.5)
        return True

    def serve() -> None:
        nonlocal conn
        conn, _ = srv.accept()
        conn.recv(4096)
        try:
            if phase == "headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                if drip(b"X-Pad: " + b"a" * 100, 6.0):
                    conn.sendall(b"\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000)  # then all of it
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                drip(b"x" * 1000, 60.0)
        except OSError:
            pass
        conn.close()

    conn: socket.socket
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    fetcher = HttpFetcher(timeout_s=5.0, deadline_s=2.0)
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/t.tar"
    t0 = time.monotonic()
    try:
        with pytest.raises(tuf_exc.SlowRetrievalError, match="not complete within 2 s"):
            if call == "download":
                fetcher.download_resumable(url, tmp_path / "t.part", 1000)
            else:
                fetcher.download_bytes(url, 1000)
        assert time.monotonic() - t0 < 4.5
    finally:
        stop.set()
        fetcher.close()
        srv.close()
        t.join(10)
