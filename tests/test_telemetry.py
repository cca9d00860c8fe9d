"""Telemetry aggregation: exact, associative merging and correct window contents."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from edge_agent.protocol import ModelRef, TelemetryWindow
from edge_agent.telemetry.aggregator import FrameResult, TelemetryAggregator
from edge_agent.telemetry.features import InputStatistics, OutputFeatures, input_statistics, output_features
from edge_agent.telemetry.histogram import FixedHistogram, default_edges, quantile_from_histogram
from edge_agent.telemetry.merge import WindowSummary, merge_windows

REF = ModelRef(name="m", version="1", sha256="0" * 64)


def _random_window(seed: int, frames: int = 50, num_classes: int = 10) -> TelemetryWindow:
    rng = random.Random(seed)
    agg = TelemetryAggregator(
        fleet="f",
        device=f"d{seed % 3}",
        session=1,
        model=REF,
        agent_version="t",
        edges=default_edges(num_classes),
        now=float(seed),
        window_frames=frames,
        window_seconds=None,
    )
    for _ in range(frames):
        p = np.array([rng.random() ** 4 for _ in range(num_classes)])
        (out,) = output_features(p / p.sum())
        inputs = InputStatistics(rng.random(), rng.random() * 0.6, rng.random() * 6, rng.random())
        lat = {"capture": rng.random() * 3, "preprocess": rng.random(), "inference": 2 + rng.random() * 10}
        agg.add(FrameResult(out, inputs if rng.random() < 0.8 else None, lat))
    agg.add_counts(captured=frames + 5, dropped=rng.randint(0, 5), failed=rng.randint(0, 3))
    agg.add_events({"source_reconnects": rng.randint(0, 2)})
    return agg.close(float(seed) + 10)


def test_histogram_counts_every_value_including_out_of_range_and_nan() -> None:
    h = FixedHistogram([0.0, 0.5, 1.0])
    for v in (-1.0, 0.0, 0.49, 0.5, 1.0, 7.0, float("nan")):
        h.add(v)
    assert h.counts == [4, 3]  # -1, 0, 0.49, nan | 0.5, 1.0, 7
    assert h.total() == 7
    with pytest.raises(ValueError):
        FixedHistogram([0.0, 0.0, 1.0])


def test_window_contains_what_was_added() -> None:
    w = _random_window(1, frames=40)
    assert w.frames.inferred == 40
    assert sum(w.class_counts.values()) == 40
    for name in ("confidence", "entropy", "margin"):
        assert sum(w.histograms[name].counts) == 40
    # input statistics were skipped on some frames: their histograms count fewer
    assert 0 < sum(w.histograms["brightness"].counts) < 40
    assert w.latency_ms["inference"].count == 40
    assert w.latency_ms["inference"].p50 is not None and 2 <= w.latency_ms["inference"].p50 <= 12
    assert w.frames.captured == 45


def test_merge_is_exact() -> None:
    windows = [_random_window(s) for s in range(6)]
    total = merge_windows(windows)
    assert total.windows == 6
    assert total.frames.inferred == sum(w.frames.inferred for w in windows)
    assert total.frames.dropped == sum(w.frames.dropped for w in windows)
    for name in default_edges(10):
        expected = np.sum([w.histograms[name].counts for w in windows], axis=0).tolist()
        assert total.histograms[name].counts == expected
    classes: dict[int, int] = {}
    for w in windows:
        for c, n in w.class_counts.items():
            classes[c] = classes.get(c, 0) + n
    assert total.class_counts == classes
    assert total.start == 0.0 and total.end == 15.0


def test_merge_is_associative_and_commutative() -> None:
    windows = [_random_window(s) for s in range(4)]
    summaries = [WindowSummary.of(w) for w in windows]
    a, b, c, d = summaries
    left = a.merge(b).merge(c).merge(d)
    right = a.merge(b.merge(c.merge(d)))
    assert left == right
    for perm in itertools.permutations(summaries):
        s = perm[0]
        for x in perm[1:]:
            s = s.merge(x)
        assert s.histograms == left.histograms and s.class_counts == left.class_counts
        assert s.frames == left.frames


def test_merge_refuses_different_edges() -> None:
    w1 = _random_window(1, num_classes=10)
    w2 = _random_window(2, num_classes=20)  # entropy edges differ
    with pytest.raises(ValueError, match="different edges"):
        merge_windows([w1, w2])


def test_window_due_by_frames_or_seconds_and_sequence_numbers() -> None:
    agg = TelemetryAggregator(
        fleet="f",
        device="d",
        session=3,
        model=REF,
        agent_version="t",
        edges=default_edges(5),
        now=100.0,
        window_seconds=10.0,
        window_frames=3,
    )
    assert not agg.is_due(105.0)
    assert agg.is_due(110.0)
    (o,) = output_features(np.array([0.2, 0.2, 0.2, 0.2, 0.2]))
    for _ in range(3):
        agg.add(FrameResult(o, None, {}))
    assert agg.is_due(101.0)
    w0 = agg.close(101.0)
    w1 = agg.close(111.0)
    assert (w0.session, w0.seq, w1.seq) == (3, 0, 1)
    assert w1.start == 101.0 and w1.frames.inferred == 0


def test_output_features() -> None:
    feats = output_features(np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    assert feats[0].top1 == 0
    assert feats[0].confidence == pytest.approx(0.7)
    assert feats[0].margin == pytest.approx(0.5)
    assert feats[1].entropy == pytest.approx(math.log(3))
    assert feats[1].margin == pytest.approx(0.0)


def test_input_statistics_respond_to_blur_darkness_and_grey() -> None:
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (3, 3), 0)
    base = input_statistics(img)
    blurred = input_statistics(cv2.GaussianBlur(img, (15, 15), 5))
    dark = input_statistics((img // 4).astype(np.uint8))
    grey = input_statistics(np.repeat(img[:, :, :1], 3, axis=2))
    assert blurred.log_laplacian_var < base.log_laplacian_var - 1
    assert dark.brightness < base.brightness / 3
    assert dark.contrast < base.contrast
    assert grey.saturation < 0.01 < base.saturation


def test_quantile_from_merged_latency_histogram() -> None:
    windows = [_random_window(s) for s in range(3)]
    total = merge_windows(windows)
    h = total.latency_hists["inference"]
    q50 = quantile_from_histogram(h, 0.5)
    assert q50 is not None and 2 <= q50 <= 12
    assert isinstance(OutputFeatures(0, 1.0, 0.0, 1.0), OutputFeatures)


def test_confidence_mean_and_atc_count_are_exact() -> None:
    agg = TelemetryAggregator(
        fleet="f",
        device="d",
        session=1,
        model=REF,
        agent_version="t",
        edges=default_edges(3),
        now=0.0,
        window_seconds=10.0,
        atc_threshold=0.6,
    )
    confs = [0.9, 0.5, 0.61, 0.35, 0.99]
    for c in confs:
        rest = (1 - c) / 2
        (o,) = output_features(np.array([c, rest, rest]))
        agg.add(FrameResult(o, None, {}))
    w = agg.close(1.0)
    assert w.confidence_mean == pytest.approx(sum(confs) / 5, abs=1e-6)
    assert w.atc_above == 3
    plain = TelemetryAggregator(
        fleet="f",
        device="d",
        session=1,
        model=REF,
        agent_version="t",
        edges=default_edges(3),
        now=0.0,
    )
    assert plain.close(1.0).atc_above is None


def test_frames_in_flight_are_carried_from_window_to_window_and_across_a_model_switch() -> None:
    """What a window carries out the next carries in (a hot swap too), so each window's counters add up,
    and so do any merged windows."""
    agg = TelemetryAggregator(
        fleet="f", device="d", session=1, model=REF, agent_version="t", edges=default_edges(10), now=0.0
    )
    (out,) = output_features(np.full(10, 0.1))
    frame = FrameResult(out, None, {"inference": 1.0})
    other = REF.model_copy(update={"version": "2"})
    published = []
    # (captured, inferred, dropped, failed) of three windows; the second ends with a hot swap
    for i, (captured, inferred, dropped, failed) in enumerate(((9, 4, 1, 1), (6, 7, 0, 1), (2, 3, 0, 0))):
        for _ in range(inferred):
            agg.add(frame)
        agg.add_counts(captured=captured, dropped=dropped, failed=failed)
        if i == 1:
            published.append(agg.switch_model(other, default_edges(10), float(i), None))
        else:
            published.append(agg.close(float(i)))
    assert [(w.frames.carried_in, w.frames.carried_out) for w in published] == [(0, 3), (3, 1), (1, 0)]
    assert [w.model.version for w in published] == ["1", "1", "2"]
    for f in [w.frames for w in published] + [merge_windows(published).frames]:
        assert f.captured + f.carried_in == f.inferred + f.dropped + f.failed + f.carried_out, f
