"""Hour and day roll-ups of telemetry windows, raw-window retention and the series read from them
(trainer/store/rollups.py), on SQLite and PostgreSQL: roll-ups are exact sums of the raw windows, a
second pass changes nothing, late windows are merged in, the purge deletes only rolled-up windows, and
reads mixing roll-ups and raw windows add up to the raw windows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from sqlalchemy import delete, select

from edge_agent.protocol import TelemetryWindow
from edge_agent.telemetry.histogram import quantile_from_histogram
from trainer.fleet.config import RetentionSettings
from trainer.fleet.service import ROLLUP_HOURS_PER_TICK, TrainerService
from trainer.sim.windows import model_ref, windows
from trainer.store import Store, Window
from trainer.store.rollups import purge_windows, read_histograms, read_series, roll_up
from trainer.store.schema import RollupCursor, WindowRollup

H = 3600.0
D = 86400.0
D0 = 1_700_006_400.0  # a UTC midnight (2023-11-15)
FLEET = "rollfleet"


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()


def make(
    device: str, ends: Sequence[float], *, seed: int = 0, first_seq: int = 0, **kw: Any
) -> list[TelemetryWindow]:
    """Simulated 10 s windows (the agent's own aggregator) re-timed to end at ``ends``; every third has
    events."""
    base = windows(device, len(ends), fleet=FLEET, seed=seed, **kw)
    return [
        w.model_copy(
            update={
                "seq": first_seq + i,
                "start": e - 10.0,
                "end": e,
                "events": {"source_reconnects": 1 + i % 2} if i % 3 == 0 else {},
            }
        )
        for i, (w, e) in enumerate(zip(base, ends, strict=True))
    ]


def every(start: float, stop: float, step: float) -> list[float]:
    """Window end times start+step, start+2*step, ... below ``stop``."""
    return [float(t) for t in np.arange(start + step, stop, step)]


def atc(w: TelemetryWindow) -> float | None:
    return None if w.atc_above is None or not w.frames.inferred else w.atc_above / w.frames.inferred


def rows(store: Store, period: str | None = None) -> list[WindowRollup]:
    q = select(WindowRollup).order_by(
        WindowRollup.period, WindowRollup.device, WindowRollup.start, WindowRollup.model_sha256
    )
    with store.read_session() as s:
        return list(s.scalars(q if period is None else q.where(WindowRollup.period == period)))


def as_tuples(rs: Sequence[WindowRollup]) -> list[tuple[Any, ...]]:
    cols = [c.name for c in WindowRollup.__table__.columns]
    return [tuple(getattr(r, c) for c in cols) for r in rs]


def payload(r: WindowRollup) -> TelemetryWindow:
    return TelemetryWindow.model_validate_json(r.payload)


def hist_sums(ws: Sequence[TelemetryWindow]) -> dict[str, list[int]]:
    """Feature histogram counts of ``ws`` summed bin by bin (numpy, not the code under test)."""
    names = {k for w in ws for k in w.histograms}
    return {
        k: np.sum([w.histograms[k].counts for w in ws if k in w.histograms], axis=0).tolist() for k in names
    }


def in_hour(ws: Sequence[TelemetryWindow], device: str, start: float) -> list[TelemetryWindow]:
    return [w for w in ws if w.device == device and start <= w.end < start + H]


def test_hour_rollups_are_exact_sums_of_their_windows(store: Store) -> None:
    ends = every(D0, D0 + 4 * H, 1200.0)  # 3 an hour, one ending exactly at each full hour
    ws = make("cam-a", ends) + make("cam-b", ends, seed=1)
    store.add_windows(ws)
    made = roll_up(store, until=D0 + 3 * H + 1800, estimate=atc)
    assert made["hour"] == 6 and made["day"] == 0  # hours 0..2 of both devices; hour 3 is not complete
    hours = rows(store, "hour")
    assert [(r.device, r.start) for r in hours] == [
        (d, D0 + i * H) for d in ("cam-a", "cam-b") for i in range(3)
    ]
    for r in hours:
        mine = in_hour(ws, r.device, r.start)
        assert (
            r.windows == len(mine) == (2 if r.start == D0 else 3)
        )  # the window ending at D0 + 1 h is hour 1's
        m = payload(r)
        assert {k: h.counts for k, h in m.histograms.items()} == hist_sums(mine)
        assert r.frames_inferred == m.frames.inferred == sum(w.frames.inferred for w in mine)
        assert m.frames.captured == sum(w.frames.captured for w in mine)
        assert r.span_s == pytest.approx(10.0 * len(mine))
        assert r.confidence_mean == pytest.approx(
            sum((w.confidence_mean or 0.0) * w.frames.inferred for w in mine) / r.frames_inferred
        )
        assert m.atc_above == sum(w.atc_above or 0 for w in mine)
        assert r.estimated_accuracy == pytest.approx(atc(m))
        assert m.events == {"source_reconnects": sum(w.events.get("source_reconnects", 0) for w in mine)}
        for stage in ("capture", "preprocess", "inference"):
            lat = m.latency_ms[stage]
            summed = np.sum([w.latency_ms[stage].hist.counts for w in mine], axis=0).tolist()  # type: ignore[union-attr]
            assert lat.hist is not None and lat.hist.counts == summed
            assert lat.count == sum(w.latency_ms[stage].count for w in mine)
            assert lat.max == max(w.latency_ms[stage].max for w in mine)  # type: ignore[type-var]
            assert lat.p50 == pytest.approx(quantile_from_histogram(lat.hist, 0.5), abs=1e-3)


def test_day_rollup_is_the_sum_of_its_hours(store: Store) -> None:
    ws = make("cam-a", every(D0, D0 + 26 * H, 1800.0))
    store.add_windows(ws)
    made = roll_up(store, until=D0 + 25 * H + 60, estimate=atc)
    assert made == {"hour": 25, "day": 1, "late": 0, "more": 0}
    (day,) = rows(store, "day")
    hours = [r for r in rows(store, "hour") if r.start < D0 + D]
    assert day.start == D0 and len(hours) == 24
    m = payload(day)
    expected = {
        k: np.sum([payload(h).histograms[k].counts for h in hours], axis=0).tolist() for k in m.histograms
    }
    assert {k: h.counts for k, h in m.histograms.items()} == expected
    assert expected == hist_sums([w for w in ws if w.end < D0 + D])
    assert day.windows == sum(h.windows for h in hours) == 47
    assert day.frames_inferred == sum(h.frames_inferred for h in hours)
    assert day.span_s == pytest.approx(sum(h.span_s for h in hours))
    inference = [payload(h).latency_ms["inference"].hist.counts for h in hours]  # type: ignore[union-attr]
    assert m.latency_ms["inference"].hist.counts == np.sum(inference, axis=0).tolist()  # type: ignore[union-attr]
    assert day.estimated_accuracy == pytest.approx(m.atc_above / m.frames.inferred)  # type: ignore[operator]


def test_roll_up_twice_and_after_losing_its_cursors_gives_the_same_rows(store: Store) -> None:
    store.add_windows(
        make("cam-a", every(D0, D0 + 27 * H, 1500.0)) + make("cam-b", every(D0, D0 + 5 * H, 900.0))
    )
    first = roll_up(store, until=D0 + 26 * H, estimate=atc)
    assert first["hour"] == 26 + 5 and first["day"] == 2  # day 0 of both devices
    before = as_tuples(rows(store))
    assert roll_up(store, until=D0 + 26 * H, estimate=atc) == {"hour": 0, "day": 0, "late": 0, "more": 0}
    assert as_tuples(rows(store)) == before
    with store.write() as conn:  # as if a pass died after writing roll-ups, before moving its cursors
        conn.execute(delete(RollupCursor))
    again = roll_up(store, until=D0 + 26 * H, estimate=atc)
    assert (again["hour"], again["day"]) == (first["hour"], first["day"])
    assert as_tuples(rows(store)) == before


def test_max_hours_spreads_a_catch_up_over_passes(store: Store) -> None:
    store.add_windows(make("cam-a", every(D0, D0 + 5 * H, 1800.0)))
    assert roll_up(store, until=D0 + 5 * H, max_hours=2)["more"] == 1
    assert len(rows(store, "hour")) == 2
    assert roll_up(store, until=D0 + 5 * H, max_hours=2)["more"] == 1
    assert roll_up(store, until=D0 + 5 * H, max_hours=2) == {"hour": 1, "day": 0, "late": 0, "more": 0}
    assert len(rows(store, "hour")) == 5


def test_late_windows_are_merged_into_rolled_hours_and_days_even_after_the_purge(store: Store) -> None:
    ws = make("cam-a", every(D0, D0 + 25 * H, 1800.0))
    store.add_windows(ws)
    roll_up(store, until=D0 + 25 * H, estimate=atc)
    late = make("cam-a", [D0 + 5 * H + 100, D0 + 5 * H + 200], seed=7, first_seq=1000)
    store.add_windows(late)
    made = roll_up(store, until=D0 + 25 * H, estimate=atc)
    assert made["late"] == 2 and made["hour"] == 0
    (hour5,) = [r for r in rows(store, "hour") if r.start == D0 + 5 * H]
    assert hour5.windows == 4
    assert {k: h.counts for k, h in payload(hour5).histograms.items()} == hist_sums(
        in_hour(ws + late, "cam-a", D0 + 5 * H)
    )
    (day,) = rows(store, "day")
    assert day.windows == 49
    assert {k: h.counts for k, h in payload(day).histograms.items()} == hist_sums(
        [w for w in ws + late if w.end < D0 + D]
    )
    # the raw windows of day 0 go; a window arriving later still is added to the roll-ups exactly
    assert purge_windows(store, keep_days=1, now=D0 + 2 * D) == 48  # the newest id stays (SQLite)
    later = make("cam-a", [D0 + 5 * H + 300], seed=8, first_seq=2000)
    store.add_windows(later)
    assert roll_up(store, until=D0 + 25 * H, estimate=atc)["late"] == 1
    (hour5,) = [r for r in rows(store, "hour") if r.start == D0 + 5 * H]
    assert hour5.windows == 5
    assert {k: h.counts for k, h in payload(hour5).histograms.items()} == hist_sums(
        in_hour(ws + late + later, "cam-a", D0 + 5 * H)
    )
    (day,) = rows(store, "day")
    assert day.windows == 50 and day.frames_inferred == 30 * 50


def test_purge_deletes_only_rolled_windows_older_than_keep_days(store: Store) -> None:
    ws = make("cam-a", every(D0, D0 + 6 * H, 1200.0))  # 17 windows, hours 0..5
    store.add_windows(ws)
    roll_up(store, until=D0 + 4 * H)  # hours 0..3 rolled
    late = make("cam-a", [D0 + H + 30], seed=3, first_seq=500)  # in rolled hour 1, not merged yet
    store.add_windows(late)
    store.add_windows(make("cam-a", [D0 + 6 * H + 60], seed=4, first_seq=600))  # the newest id
    assert purge_windows(store, keep_days=1, now=D0 + 3 * H + D) == 8  # ended before D0 + 3 h, rolled
    left = {w.seq for w in store.windows(device="cam-a")}
    assert left == {w.seq for w in ws if w.end >= D0 + 3 * H} | {500, 600}
    # a cut-off beyond the hour cursor stops at the cursor: hours 4 and 5 are not rolled up
    assert purge_windows(store, keep_days=1, now=D0 + 30 * D) == 3
    left = {w.seq for w in store.windows(device="cam-a")}
    assert left == {w.seq for w in ws if w.end >= D0 + 4 * H} | {500, 600}
    roll_up(store, until=D0 + 4 * H)  # the late window is rolled up now, and can go
    assert purge_windows(store, keep_days=1, now=D0 + 30 * D) == 1
    assert 500 not in {w.seq for w in store.windows(device="cam-a")}
    # the window with the newest id is kept even when rolled up (SQLite would hand its id out again)
    roll_up(store, until=D0 + 7 * H)
    assert purge_windows(store, keep_days=1, now=D0 + 30 * D) == 6
    assert [w.seq for w in store.windows(device="cam-a")] == [600]
    hours = rows(store, "hour")
    assert sum(r.windows for r in hours) == 19  # nothing purged was lost


def test_read_series_resolution_and_frames(store: Store) -> None:
    ws = make("cam-a", every(D0, D0 + 3 * D, 1800.0)) + make("cam-b", every(D0, D0 + 3 * H, 600.0), seed=2)
    store.add_windows(ws)
    roll_up(store, until=D0 + 2 * D + 3 * H, estimate=lambda w: 0.5)
    mine = [w for w in ws if w.device == "cam-a"]

    def frames(lo: float, hi: float) -> int:
        return sum(w.frames.inferred for w in mine if lo <= w.end < hi)

    s = read_series(store, "cam-a", D0 + 2 * D, D0 + 2 * D + 6 * H)
    assert s.resolution == "window" and len(s.points) == 12
    first = next(w for w in mine if w.end >= D0 + 2 * D)
    p = s.points[0]
    assert (p.start, p.end, p.windows, p.frames_inferred) == (
        first.start,
        first.end,
        1,
        first.frames.inferred,
    )
    assert p.latency_p50_ms == first.latency_ms["inference"].p50
    assert p.estimated_accuracy == pytest.approx(atc(first))
    assert p.events == first.events and p.frames_per_second == pytest.approx(first.frames.inferred / 10.0)
    assert sum(p.frames_inferred for p in s.points) == frames(D0 + 2 * D, D0 + 2 * D + 6 * H)

    s = read_series(store, "cam-a", D0 + D, D0 + 2 * D + 6 * H + 1)  # rolled hours, then raw ones
    assert s.resolution == "hour"
    assert [p.start for p in s.points] == [D0 + D + i * H for i in range(31)]
    assert sum(p.frames_inferred for p in s.points) == frames(D0 + D, D0 + 2 * D + 7 * H)
    newest = s.points[-1]  # hour 6 of day 2 is not rolled up: merged from its raw windows
    assert newest.windows == 2 and newest.estimated_accuracy != 0.5
    assert s.points[0].estimated_accuracy == 0.5  # a roll-up's stored estimate

    s = read_series(store, "cam-a", D0 - 40 * D, D0 + 5 * D + 1)
    assert s.resolution == "day"
    assert [p.start for p in s.points] == [D0, D0 + D, D0 + 2 * D]  # day 2: its hour roll-ups + raw
    assert [p.windows for p in s.points] == [47, 48, 48]
    assert sum(p.frames_inferred for p in s.points) == frames(D0, D0 + 3 * D)
    assert s.points[2].frames_per_second == pytest.approx(3.0)  # 30 frames per 10 s window
    assert read_series(store, "cam-a", D0, D0 + 45 * D).resolution == "hour"


def test_read_histograms_mixing_rolled_and_raw_periods_is_the_raw_merge(store: Store) -> None:
    old, new = model_ref(version="1.0.0"), model_ref(version="2.0.0")
    ws = make("cam-a", every(D0, D0 + 2 * D + 10 * H, 1800.0), model=old)
    ws += make("cam-a", [D0 + 2 * D + 10 * H + 600], seed=5, first_seq=900, model=new)
    store.add_windows(ws)
    roll_up(store, until=D0 + 2 * D + 5 * H)
    late = make("cam-a", [D0 + 7 * H + 60], seed=6, first_seq=950, model=old)  # not rolled up yet
    store.add_windows(late)
    ws += late
    sha = old.sha256

    def raw(lo: float, hi: float, model: str = sha) -> dict[str, list[int]]:
        return hist_sums([w for w in ws if lo <= w.end < hi and w.model.sha256 == model])

    lo, hi = D0 + 1800 + 7, D0 + 2 * D + 8 * H + 13  # raw, hours, a day, hours, raw
    got = read_histograms(store, "cam-a", lo, hi, model_sha256=sha)
    assert {k: h.counts for k, h in got.items()} == raw(lo, hi)
    newest = read_histograms(store, "cam-a", lo, D0 + 3 * D)  # default: the newest window's model
    assert {k: h.counts for k, h in newest.items()} == raw(lo, D0 + 3 * D, new.sha256)
    expected = raw(D0, hi)
    assert purge_windows(store, keep_days=0.01, now=D0 + 10 * D) > 90
    got = read_histograms(store, "cam-a", D0, hi, model_sha256=sha)  # rolled part from roll-ups only
    assert {k: h.counts for k, h in got.items()} == expected


def test_service_rollup_step_rolls_up_and_purges(store: Store) -> None:
    with pytest.raises(ValidationError):
        RetentionSettings(keep_raw_days=0)
    store.add_windows(make("cam-a", every(D0, D0 + 3 * H, 1800.0)))
    cfg = SimpleNamespace(retention=RetentionSettings(keep_raw_days=1, rollup_every_s=300), grace_s=15.0)
    svc: Any = SimpleNamespace(store=store, cfg=cfg, _rollup_due=0.0)
    now = D0 + D + 3 * H
    TrainerService._rollup_step(svc, now)  # a catch-up: a few hours per tick, the rest on the next one
    assert len(rows(store, "hour")) == ROLLUP_HOURS_PER_TICK == 2 and svc._rollup_due == now
    assert store.count_windows() == 2  # the rolled windows older than a day are gone
    TrainerService._rollup_step(svc, now + 2)
    assert len(rows(store, "hour")) == 3 and len(rows(store, "day")) == 1
    assert store.count_windows() == 1  # all five are rolled up and older than a day; the newest stays
    assert svc._rollup_due == now + 2 + 300
    with store.read_session() as s:
        assert s.scalar(select(Window.seq).where(Window.device == "cam-a")) == 4
    TrainerService._rollup_step(svc, now + 299)  # not due: nothing runs
    assert svc._rollup_due == now + 2 + 300
