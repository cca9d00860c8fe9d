"""Opt-in sampling: which frames are chosen, the hourly cap, and the privacy filter on real photographs."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.privacy import detect_faces, privacy_filter
from edge_agent.sampling import SampleSelector, SamplingSettings
from trainer.data.photos import load_photos


def test_sampling_is_off_by_default_and_needs_consent() -> None:
    sel: SampleSelector[int] = SampleSelector(SamplingSettings(), now=0)
    for i in range(10):
        sel.offer(0.01, i, now=1)
    assert sel.choose(now=60) == []
    with pytest.raises(ValidationError, match="needs sampling.consent"):
        SamplingSettings(enabled=True)


def test_keeps_the_lowest_confidence_frames_of_a_window() -> None:
    s = SamplingSettings(enabled=True, consent="test", per_window=3, low_confidence=0.5, max_per_hour=100)
    sel: SampleSelector[int] = SampleSelector(s, now=0)
    confs = [0.9, 0.2, 0.45, 0.1, 0.6, 0.3, 0.05, 0.49]
    for i, c in enumerate(confs):
        sel.offer(c, i, now=1)
    chosen = sel.choose(now=60)
    assert [c.item for c in chosen] == [6, 3, 1]  # 0.05, 0.1, 0.2: best first
    assert {c.reason for c in chosen} == {"low_confidence"}
    assert sel.choose(now=61) == []  # a new window starts empty


def test_hourly_cap_across_windows() -> None:
    s = SamplingSettings(enabled=True, consent="test", per_window=5, max_per_hour=12)
    sel: SampleSelector[int] = SampleSelector(s, now=0)
    sent = 0
    for window in range(10):  # ten one-minute windows, each with plenty of candidates
        for i in range(20):
            sel.offer(0.1, i, now=window * 60 + 1)
        sent += len(sel.choose(now=window * 60 + 60))
    assert sent == 12 + 1  # the full bucket, plus ~1 token refilled over the 10 minutes (12/h)
    assert sel.capped == 10 * 5 - sent


def test_drift_mode_samples_uniformly_including_confident_frames() -> None:
    s = SamplingSettings(enabled=True, consent="test", per_window=50, max_per_hour=3600)
    sel: SampleSelector[float] = SampleSelector(s, now=0, rng=random.Random(3))
    sel.drift_until = 100.0
    for i in range(1000):
        sel.offer(0.99, float(i), now=10)  # confident frames: never chosen in normal mode
    chosen = sel.choose(now=20)
    assert len(chosen) == 50 and {c.reason for c in chosen} == {"drift"}
    values = [c.item for c in chosen]
    assert 300 < float(np.mean(values)) < 700  # spread over the window, not the first or last frames


def test_privacy_filter_blurs_faces_downscales_and_strips_metadata() -> None:
    astronaut = load_photos(["astronaut"])["astronaut"]  # 512x512 portrait with a face
    assert detect_faces(cv2.resize(astronaut, (320, 320), interpolation=cv2.INTER_AREA)), (
        "test photo should have a face"
    )
    out = privacy_filter(astronaut, max_side=320)
    assert (out.width, out.height) == (320, 320) and out.faces >= 1
    decoded = cv2.imdecode(np.frombuffer(out.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert detect_faces(decoded) == []  # no recognisable face left
    assert out.jpeg[:2] == b"\xff\xd8" and b"Exif" not in out.jpeg[:4096]
    cat = privacy_filter(load_photos(["chelsea"])["chelsea"], max_side=200)
    assert cat.faces == 0 and max(cat.width, cat.height) == 200
