"""Frame sources: URIs, finite vs live delivery, corrupt frames, lost streams and reconnection."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.backoff import Backoff
from edge_agent.errors import SourceError
from edge_agent.sources import EndOfStream, open_source
from edge_agent.sources.base import Frame, FrameSource, redact_credentials
from trainer.ops.broker import free_port

from .mqtt_helpers import wait_until


def drain(source: FrameSource, limit: int = 10_000, timeout: float = 20) -> list[Frame]:
    frames = []
    deadline = time.monotonic() + timeout
    while len(frames) < limit and time.monotonic() < deadline:
        try:
            f = source.read(timeout=0.5)
        except EndOfStream:
            break
        if f is not None:
            frames.append(f)
    return frames


def write_video(path: Path, n: int, size: tuple[int, int] = (160, 120)) -> None:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, size)
    assert w.isOpened()
    for i in range(n):
        img = np.full((size[1], size[0], 3), (i * 7) % 255, np.uint8)
        cv2.putText(img, str(i), (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 2)
        w.write(img)
    w.release()


def test_dir_source_delivers_each_image_once_and_skips_corrupt_files(tmp_path: Path) -> None:
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((40, 50, 3), i * 40, np.uint8))
    (tmp_path / "2b-truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "3b-empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    src = open_source(f"dir:{tmp_path}").start()
    frames = drain(src)
    src.close()
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 40, 80, 120, 160]  # name order, once each
    s = src.stats()
    assert (s.captured, s.corrupt, s.dropped) == (7, 2, 0)  # every file read is captured, corrupt ones too
    with pytest.raises(EndOfStream):
        src.read(timeout=0.1)


def test_file_source_ends_or_loops(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, 12)
    src = open_source(f"file:{video}").start()
    assert len(drain(src)) == 12
    src.close()
    looping = open_source(f"file:{video}", loop=True).start()
    assert len(drain(looping, limit=30)) == 30  # wrapped around twice
    looping.close()


def test_live_source_keeps_only_the_freshest_frame() -> None:
    src = open_source("synthetic:?fps=200").start()
    time.sleep(0.5)  # nobody reads: frames pile up and are replaced
    first = src.read(timeout=1)
    assert first is not None
    time.sleep(0.2)
    second = src.read(timeout=1)
    src.close()
    assert second is not None and second.index - first.index > 10  # skipped straight to the newest
    s = src.stats()
    assert s.dropped > 50 and s.captured >= s.dropped


def test_synthetic_corrupt_frames_are_counted_and_skipped() -> None:
    src = open_source("synthetic:?fps=0&frames=30&corrupt_every=3").start()
    frames = drain(src)
    src.close()
    assert len(frames) == 20 and (src.stats().captured, src.stats().corrupt) == (30, 10)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("camera:front", "camera index must be an integer"),
        ("dir:/no/such/dir", "is not a directory"),
        ("file:/no/such.mp4", "video file /no/such.mp4 not found"),
        ("synthetic:?fps=abc", "bad synthetic parameter"),
        ("synthetic:?colour=red", "unknown synthetic parameter"),
        ("rtsp://", "stream URL has no host"),
        ("gopher://x", "unknown source scheme"),
    ],
)
def test_bad_uris_are_rejected_with_the_reason(uri: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_source(uri)


def test_unplugged_camera_is_retried_with_backoff() -> None:
    src = open_source("camera:9", reconnect_min_s=0.05, reconnect_max_s=0.2).start()
    assert wait_until(lambda: src.stats().open_failures >= 3, 10)
    assert src.read(timeout=0.1) is None  # no frames, no crash
    assert src.last_error is not None
    src.close()


class _Server:
    """A static HTTP server for a video file, stoppable and restartable on the same port."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.httpd: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.httpd is not None
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_http_stream_reconnects_after_the_server_goes_away(tmp_path: Path) -> None:
    write_video(tmp_path / "cam.avi", 20)
    port = free_port()
    server = _Server(tmp_path, port)
    server.start()
    src = open_source(f"http://127.0.0.1:{port}/cam.avi", reconnect_min_s=0.05, reconnect_max_s=0.3)
    assert src.live
    src.start()
    try:
        # A stream that ends is a lost stream for a live source: it is reopened.
        assert wait_until(lambda: src.stats().captured >= 30 and src.stats().reconnects >= 1, 20)
        server.stop()
        assert wait_until(lambda: src.stats().open_failures >= 2, 20), src.stats()
        before = src.stats().captured
        server.start()
        assert wait_until(lambda: src.stats().captured > before + 10, 20), src.stats()
        assert src.read(timeout=2) is not None
    finally:
        src.close()
        server.stop()


def test_a_password_in_a_stream_url_never_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """It was logged on every reconnect."""
    port = free_port()  # nothing listens: every open fails and is logged
    src = open_source(
        f"http://admin:s3cret@127.0.0.1:{port}/cam.mjpg", reconnect_min_s=0.05, reconnect_max_s=0.1
    )
    with caplog.at_level("DEBUG", logger="edge_agent.sources"):
        src.start()
        try:
            assert wait_until(lambda: src.stats().open_failures >= 2, 20), src.stats()
        finally:
            src.close()
    assert "http://admin:***@127.0.0.1" in caplog.text
    assert "s3cret" not in caplog.text and "s3cret" not in src.name
    with pytest.raises(SourceError) as exc:
        open_source("rtsp://admin:s3cret@/stream")  # no host
    assert "s3cret" not in str(exc.value) and "admin:***@" in str(exc.value)
    # A raw '@' in the password: the userinfo runs to the last '@' before the host ("ss@" leaked).
    src = open_source("rtsp://admin:p@ss@cam.local:554/stream")
    assert src.name == "rtsp://admin:***@cam.local:554/stream"
    cases = {
        "rtsp://admin:p@ss@cam/stream": "rtsp://admin:***@cam/stream",
        "rtsp://ad@min:p@ss:w@rd@cam/a@b": "rtsp://ad@min:***@cam/a@b",  # an '@' after the host stays
        "http://admin@cam/x and rtsp://u:p@q@cam2/y": "http://admin:***@cam/x and rtsp://u:***@cam2/y",
        "rtsp://cam/stream?user=a@b": "rtsp://cam/stream?user=a@b",  # no userinfo: nothing to redact
    }
    assert {url: redact_credentials(url) for url in cases} == cases


def test_backoff_schedule() -> None:
    import random

    b = Backoff(0.5, 4.0, rng=random.Random(1))
    delays = [b.next() for _ in range(6)]
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps))
    b.reset()
    assert b.next() <= 0.5
