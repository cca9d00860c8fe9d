"""What one hostile device or one operator mistake could do to everyone's data, each refused at the
layer where it enters (issue 13): malformed histograms, non-finite numbers, oversized JPEG headers,
reserved names, dead-letter floods and certificates re-issued by accident."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError
from sqlalchemy import insert

from edge_agent import protocol as p
from edge_agent.image_header import ImageHeaderError, check_image_size, jpeg_size
from trainer.data.dataset import decode_image
from trainer.ingest.routing import Accepted, classify
from trainer.ops import pki as pki_mod
from trainer.sim.windows import model_ref, tiny_window, windows
from trainer.store import Rejected, Store
from trainer.store.ingest_writes import OVERFLOW_SHA256, DeadLetterCaps, write_dead_letters
from trainer.store.schema import Window

FLEET = "hard"


def _tele(window: dict, device: str = "cam1") -> Accepted | Rejected:
    return classify(p.tele_topic(FLEET, device), json.dumps(window).encode(), 1.0)


def _window_dict(**changes: object) -> dict:
    w = json.loads(tiny_window("cam1", 0, fleet=FLEET).to_bytes())
    w.update(changes)
    return w


@pytest.mark.parametrize(
    ("hist", "problem"),
    [
        ({"edges": [0.0, 0.5, 1.0], "counts": [1, 2, 3]}, "3 counts for 3 edges"),
        ({"edges": [0.0, 0.5, 1.0], "counts": [4]}, "1 counts for 3 edges"),
        ({"edges": [0.0, 0.5, 1.0], "counts": [4, -1]}, "greater than or equal to 0"),
        ({"edges": [0.0, 0.5, 0.5], "counts": [1, 1]}, "increase strictly"),
    ],
)
def test_a_malformed_histogram_is_refused_at_ingest(hist: dict, problem: str) -> None:
    w = _window_dict()
    w["histograms"]["confidence"] = hist
    r = _tele(w)
    assert isinstance(r, Rejected) and r.reason == "invalid", r
    assert problem in r.detail and "histograms.confidence" in r.detail


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused_on_both_sides(number: str) -> None:
    text = json.dumps(_window_dict(confidence_mean=0.5)).replace(
        '"confidence_mean": 0.5', f'"confidence_mean": {number}'
    )
    r = classify(p.tele_topic(FLEET, "cam1"), text.encode(), 1.0)  # the trainer's ingest
    assert isinstance(r, Rejected) and r.reason == "invalid" and "finite" in r.detail, r
    hint = json.loads(
        p.ReleaseHint(
            fleet=FLEET,
            channel="stable",
            model="m",
            version="1",
            release=3,
            target="stable/hard/m.tar",
            sha256="a" * 64,
            length=10,
            package_sha256="b" * 64,
            ts=1.0,
        ).to_bytes()
    )
    raw = json.dumps(hint).replace('"ts": 1.0', f'"ts": {number}').encode()
    with pytest.raises(p.MessageError, match="at ts: Input should be a finite number"):  # the agent
        p.parse_message(p.release_topic(FLEET, "stable"), raw, p.ReleaseHint)
    with pytest.raises(ValidationError):  # and nothing non-finite can be built to be sent
        p.TelemetryWindow.model_validate({**_window_dict(), "confidence_mean": float("nan")})


def test_one_bad_stored_window_costs_only_itself(tmp_path: Path) -> None:
    """A window stored before the checks existed is left out by readers, not fatal to the slot."""
    good = windows("cam1", 3, fleet=FLEET, model=model_ref())
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        store.add_windows(good)
        bad = json.loads(good[0].to_bytes())
        bad.update(device="cam2", seq=0)
        bad["histograms"]["confidence"]["counts"] = bad["histograms"]["confidence"]["counts"][:-1]
        row = {c: getattr(good[0], c, None) for c in ("fleet", "session", "seq", "start", "end")}
        with store.write() as conn:
            conn.execute(
                insert(Window),
                {
                    **row,
                    "device": "cam2",
                    "seq": 0,
                    "model_name": "m",
                    "model_version": "1",
                    "model_sha256": good[0].model.sha256,
                    "frames_inferred": 1,
                    "frames_failed": 0,
                    "model_known": False,
                    "payload": json.dumps(bad),
                    "received_at": 1.0,
                },
            )
        assert store.count_windows() == 4
        assert store.windows(fleet=FLEET) == good


@pytest.mark.parametrize("device", ["fleet", "trainer", "Monitor", "ingest", "homeassistant"])
def test_reserved_names_cannot_be_devices_anywhere(device: str, tmp_path: Path) -> None:
    w = _window_dict(device=device)
    r = classify(p.tele_topic(FLEET, device), json.dumps(w).encode(), 1.0)
    assert isinstance(r, Rejected) and r.reason == "invalid" and "reserved" in r.detail, r
    from edge_agent.config import AgentConfig

    with pytest.raises(ValidationError, match="reserved"):
        AgentConfig.model_validate(
            {"device_id": device, "source": {"uri": "synthetic:"}, "model": {"package": "m"}}
        )
    pki_mod.init_ca(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        pki_mod.issue(tmp_path, device, kind="device")
    assert not (tmp_path / "device").exists()


def test_reissuing_a_certificate_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.cli import main

    assert main(["pki", "init", "--dir", str(tmp_path)]) == 0
    assert main(["pki", "issue-device", "cam-7", "--dir", str(tmp_path)]) == 0
    key = (tmp_path / "device" / "cam-7.key").read_bytes()
    assert main(["pki", "issue-device", "cam-7", "--dir", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "device" / "cam-7.key").read_bytes() == key
    assert main(["pki", "issue-device", "cam-7", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "device" / "cam-7.key").read_bytes() != key


def _jpeg(width: int, height: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((height, width, 3), 127, np.uint8))
    assert ok
    return buf.tobytes()


def _declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header rewritten to declare another size (the bytes stay small)."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[: i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9 :]


def test_jpeg_dimensions_are_checked_before_decoding() -> None:
    small = _jpeg(64, 48)
    assert jpeg_size(small) == (64, 48)
    bomb = _declaring(small, 16000, 16000)
    assert len(bomb) < 1000
    with pytest.raises(ImageHeaderError, match="16000x16000"):
        check_image_size(bomb)
    assert decode_image(bomb) is None  # retraining skips it instead of decoding 16000x16000
    assert decode_image(_declaring(small, 65535, 65535)) is None  # cv2 would raise on this one
    assert decode_image(small) is not None

    def sample(image: bytes, width: int = 64, height: int = 48) -> bytes:
        return p.Sample(
            fleet=FLEET,
            device="cam1",
            session=1,
            frame=1,
            ts=1.0,
            model=model_ref(),
            reason="audit",
            inclusion=0.1,
            top=[(1, 0.5)],
            consent="test",
            faces_blurred=0,
            width=width,
            height=height,
            sha256=hashlib.sha256(image).hexdigest(),
            jpeg_b64=base64.b64encode(image).decode(),
        ).to_bytes()

    topic = p.sample_topic(FLEET, "cam1")
    assert isinstance(classify(topic, sample(small), 1.0), Accepted)
    for payload, problem in (
        (sample(bomb), "16000x16000"),
        (sample(_declaring(small, 64, 4800)), "declares 64x4800, the message 64x48"),
        (sample(b"\xff\xd8\xff\xd9"), "no frame header"),
    ):
        r = classify(topic, payload, 1.0)
        assert isinstance(r, Rejected) and r.reason == "invalid" and problem in r.detail, r


def test_dead_letters_are_capped_per_device_and_in_total_and_the_drops_counted(tmp_path: Path) -> None:
    """One allowance per device for all its topics (four ingest kinds, any fleet segment it claims), one
    for everything; what the caps drop is counted in one over_cap row per device and alerted once."""
    caps = DeadLetterCaps(per_device=5, total=12)
    kinds = (p.tele_topic, p.status_topic, p.sample_topic, p.update_topic)
    flood = [
        Rejected(
            kinds[i % 4](FLEET if i % 3 else "elsewhere", "noisy"),
            f"junk {i}".encode(),
            "not_json",
            "x",
            float(i),
        )
        for i in range(45)
    ]
    cam2 = [
        Rejected(p.tele_topic(FLEET, "cam2"), f"bad {i}".encode(), "not_json", "x", float(i))
        for i in range(6)
    ]
    cam3 = [
        Rejected(p.status_topic(FLEET, "cam3"), f"odd {i}".encode(), "invalid", "x", 100.0 + i)
        for i in range(6)
    ]
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        with store.write() as conn:
            assert write_dead_letters(conn, flood[:30], caps) == 25
        with store.write() as conn:  # cam2 until its own cap, cam3 until the total cap
            assert write_dead_letters(conn, flood[30:40] + flood[:2] + cam2 + cam3, caps) == 10 + 1 + 4
        with store.write() as conn:  # more of the same: counted in the same rows, alerted no more
            assert write_dead_letters(conn, flood[40:], caps) == 5
        rows = store.dead_letters()
        kept = [d for d in rows if d.payload_sha256 != OVERFLOW_SHA256]
        per_device = Counter(d.topic.split("/")[4] for d in kept)
        assert per_device == {"noisy": 5, "cam2": 5, "cam3": 2}
        assert len({d.topic for d in kept if "/noisy/" in d.topic}) > 2  # its topics share one allowance
        over = {d.topic: d.count for d in rows if d.payload_sha256 == OVERFLOW_SHA256}
        assert over == {"ef/v1/+/dev/noisy/#": 40, "ef/v1/+/dev/cam2/#": 1, "ef/v1/+/dev/cam3/#": 4}
        repeated = {d.payload: d.count for d in kept}
        assert repeated[b"junk 0"] == 2  # a payload already kept still counts up
        alerts = sorted((a.kind, a.device) for a in store.alerts())
        assert alerts == [("dead_letters_capped", d) for d in ("cam2", "cam3", "noisy")]
