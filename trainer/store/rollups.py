"""Hour and day roll-ups of telemetry windows, raw-window retention, and the time series read from them.

Why: a device sends a window a minute, so a 30-day chart of one device would read 43,200 raw windows.
``window_rollups`` holds each device's windows of one model merged exactly per UTC hour and per UTC day
(feature and latency histograms, frame and class counts and events add up:
:func:`edge_agent.telemetry.merge.merge_to_window`), so that chart reads 720 hour rows, and raw windows
can be deleted after a while without losing their statistics.

:func:`roll_up` does, in one pass:

1. **late windows**: windows stored since the previous pass whose hour is already rolled up are merged
   into that hour's roll-up, and the day's roll-up is rebuilt from its hours if the day was rolled up
   too. Merging only adds counts, so this is exact even after the hour's raw windows were deleted: a
   window is in the roll-ups however late it arrives (from the next pass on).
2. **hours**: every complete UTC hour (a window belongs to the hour its ``end`` falls in,
   ``[h, h + 3600)``) that ends at or before ``until`` and after the ``hour`` cursor; one query per hour,
   streamed, its (device, model) groups written ``BATCH`` rows per transaction.
3. **days**: every UTC day whose hours are all rolled up, merged from its hour roll-ups.

Roll-ups are upserted on (device, model, period, start), so a repeated pass rewrites the same rows.

Bookkeeping rows in ``rollup_cursors``: ``hour`` and ``day`` are where the rolled periods end;
``hour.window_id`` is an id watermark S: an hour before the ``hour`` cursor holds exactly its windows with
``id <= S``, so step 1 finds late windows by a primary-key range (``id > S``), not by a scan. S is taken
while no insert into ``windows`` is in flight (ids are allocated before commit): on PostgreSQL under a
brief ``SHARE`` lock on the table, on SQLite under the write lock. ``lock`` is a lease (its expiry time)
so that one pass runs at a time, e.g. when the services of several fleets share a database; every write
of a pass checks and renews it.

:func:`purge_windows` deletes raw windows that ended more than ``keep_days`` ago and are in the hour
roll-ups (ended before the ``hour`` cursor and ``id <= S``). :func:`read_series` and
:func:`read_histograms` read roll-ups for the rolled part of a range and raw windows for the rest.

A window whose histogram bins differ from the other windows of its device, model and hour cannot be
merged: it is left out of the roll-up (logged) and purged with the others.

Windows have no index on ``end``: steps 2 and 3 and the purge scan ``windows`` by ``end`` (as the drift
service's slot reads do); an index on ``windows(end)`` would make them range scans.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy import (
    JSON,
    Connection,
    Select,
    Text,
    and_,
    cast,
    delete,
    false,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy import type_coerce as coerce

from edge_agent.protocol import Histogram, TelemetryWindow
from edge_agent.telemetry.histogram import LATENCY_STAGES, merge_histograms
from edge_agent.telemetry.merge import merge_to_window
from trainer.store.engine import insert
from trainer.store.schema import RollupCursor, Window, WindowRollup
from trainer.store.store import Store

log = logging.getLogger(__name__)

Estimator = Callable[[TelemetryWindow], float | None]
"""A label-free accuracy estimate of a (merged) window, or None."""
Resolution = Literal["window", "hour", "day"]

HOUR_S = 3600.0
DAY_S = 86400.0
PERIOD_S = {"hour": HOUR_S, "day": DAY_S}
RAW_UP_TO_S = 6 * HOUR_S
"""read_series: ranges up to this long are raw windows."""
HOURS_UP_TO_S = 45 * DAY_S
"""read_series: longer ranges than RAW_UP_TO_S, up to this, are hours; longer still, days."""
BATCH = 500
"""Roll-up rows per write transaction; late windows per transaction."""
PURGE_BATCH = 5000
"""Raw windows deleted per transaction (SQLite's ingest waits for each)."""
ID_CURSOR = "hour.window_id"
LEASE = "lock"
LEASE_S = 600.0
LATENCY_ORDER = ("inference", *(s for s in LATENCY_STAGES if s != "inference"))
"""The latency stage a point's p50 comes from: inference, else the first of the others present."""


# -- bookkeeping -------------------------------------------------------------------------------------
class _LeaseLost(Exception):
    """Another pass holds the lease now (this one stalled for longer than LEASE_S)."""


@dataclass
class _Lease:
    expires: float


def _acquire(store: Store) -> _Lease | None:
    """The roll-up lease, unless another pass holds an unexpired one."""
    now = time.time()
    with store.write() as conn:
        conn.execute(
            insert(conn, RollupCursor.__table__)
            .values(period=LEASE, rolled_until=0.0)
            .on_conflict_do_nothing(index_elements=["period"])
        )
        taken = conn.execute(
            update(RollupCursor)
            .where(RollupCursor.period == LEASE, RollupCursor.rolled_until < now)
            .values(rolled_until=now + LEASE_S)
        ).rowcount
    return _Lease(now + LEASE_S) if taken == 1 else None


def _release(store: Store, lease: _Lease) -> None:
    with store.write() as conn:
        conn.execute(
            update(RollupCursor)
            .where(RollupCursor.period == LEASE, RollupCursor.rolled_until == lease.expires)
            .values(rolled_until=0.0)
        )


@contextmanager
def _writing(store: Store, lease: _Lease) -> Iterator[Connection]:
    """A write transaction of the pass holding ``lease``: renewed first, _LeaseLost if it was taken."""
    renewed = max(time.time() + LEASE_S, lease.expires + 1.0)
    with store.write() as conn:
        held = conn.execute(
            update(RollupCursor)
            .where(RollupCursor.period == LEASE, RollupCursor.rolled_until == lease.expires)
            .values(rolled_until=renewed)
        ).rowcount
        if held != 1:
            raise _LeaseLost
        yield conn
    lease.expires = renewed  # committed


def _cursors(store: Store) -> dict[str, float]:
    with store.engine.connect() as conn:
        return {p: float(v) for p, v in conn.execute(select(RollupCursor.period, RollupCursor.rolled_until))}


def _set_cursor(conn: Connection, period: str, value: float) -> None:
    stmt = insert(conn, RollupCursor.__table__).values(period=period, rolled_until=value)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["period"], set_={"rolled_until": stmt.excluded.rolled_until}
        )
    )


def _cursor_to(period: str, value: float) -> Callable[[Connection], None]:
    return lambda conn: _set_cursor(conn, period, value)


def _top_id(store: Store) -> int:
    """The largest window id, read while no insert is in flight: every smaller id is committed."""
    with store.write() as conn:
        if conn.dialect.name == "postgresql":
            table = conn.dialect.identifier_preparer.quote(Window.__tablename__)
            conn.exec_driver_sql(f"LOCK TABLE {table} IN SHARE MODE")  # waits for ingest's open inserts
        return int(conn.scalar(select(func.max(Window.id))) or 0)


# -- merging -----------------------------------------------------------------------------------------
@dataclass
class _Part:
    """A raw window (windows=1) or a roll-up, as merged into a roll-up."""

    window: TelemetryWindow
    windows: int
    span_s: float


def _parse(payload: str) -> TelemetryWindow | None:
    try:
        return TelemetryWindow.model_validate_json(payload)
    except ValidationError as exc:
        log.warning(
            "roll-ups: a stored window no longer validates and is left out (%s)", exc.errors()[0]["msg"]
        )
        return None


def _same_bins(a: TelemetryWindow, b: TelemetryWindow) -> bool:
    return all(h.edges == b.histograms[k].edges for k, h in a.histograms.items() if k in b.histograms)


def _merge(parts: Sequence[_Part]) -> _Part | None:
    """The exact merge of ``parts``; parts whose histogram bins differ from the first's are left out."""
    kept = [p for p in parts if _same_bins(parts[0].window, p.window)]
    if len(kept) < len(parts):
        w = parts[0].window
        log.warning(
            "roll-ups: %d window(s) of %s on %s have other histogram bins: left out",
            len(parts) - len(kept),
            w.device,
            w.model.sha256[:12],
        )
    try:
        merged = merge_to_window([p.window for p in kept])
    except ValueError as exc:
        log.warning("roll-ups: windows of %s not merged: %s", parts[0].window.device, exc)
        return None
    return _Part(merged, sum(p.windows for p in kept), sum(p.span_s for p in kept))


def _estimate(estimate: Estimator | None, w: TelemetryWindow) -> float | None:
    if estimate is None:
        return None
    try:
        return estimate(w)
    except ValueError as exc:  # e.g. bins that do not match the model's reference
        log.warning("roll-ups: no accuracy estimate for %s: %s", w.device, exc)
        return None


def _row(part: _Part, period: str, start: float, estimate: Estimator | None) -> dict[str, Any]:
    w = part.window
    return {
        "fleet": w.fleet,
        "device": w.device,
        "model_sha256": w.model.sha256,
        "period": period,
        "start": start,
        "windows": part.windows,
        "frames_inferred": w.frames.inferred,
        "frames_failed": w.frames.failed,
        "span_s": part.span_s,
        "confidence_mean": w.confidence_mean,
        "estimated_accuracy": _estimate(estimate, w),
        "payload": w.model_dump_json(exclude_none=True),
    }


_UPDATED = (
    "fleet",
    "windows",
    "frames_inferred",
    "frames_failed",
    "span_s",
    "confidence_mean",
    "estimated_accuracy",
    "payload",
)


def _upsert(conn: Connection, rows: list[dict[str, Any]]) -> int:
    if not rows:
        return 0
    stmt = insert(conn, WindowRollup.__table__)
    stmt = stmt.on_conflict_do_update(
        index_elements=["device", "model_sha256", "period", "start"],
        set_={c: stmt.excluded[c] for c in _UPDATED},
    )
    conn.execute(stmt, rows)
    return len(rows)


def _text(payload: Any) -> Any:
    """A JSON column as its text: psycopg would decode ``json`` into a dict that RawJSON encodes again."""
    return cast(payload, Text).label("payload")


def _raw_parts() -> Select[Any]:
    """Raw windows as parts: device, model, windows, span, payload, end, id."""
    cols: tuple[Any, ...] = (
        Window.device,
        Window.model_sha256,
        literal(1).label("windows"),
        (Window.end - Window.start).label("span_s"),
        _text(Window.payload),
        Window.end,
        Window.id,
    )
    return select(*cols)


def _rollup_parts() -> Select[Any]:
    """Roll-ups as parts: device, model, windows, span, payload, start."""
    r = WindowRollup
    cols: tuple[Any, ...] = (r.device, r.model_sha256, r.windows, r.span_s, _text(r.payload), r.start)
    return select(*cols)


def _groups(rows: Iterable[Any]) -> Iterator[list[_Part]]:
    """Rows of _raw_parts / _rollup_parts sorted by device and model -> each (device, model)'s parts."""
    for _, grp in itertools.groupby(rows, key=lambda r: (r[0], r[1])):
        parts = [_Part(w, int(r[2]), float(r[3])) for r in grp if (w := _parse(r[4])) is not None]
        if parts:
            yield parts


# -- roll_up -----------------------------------------------------------------------------------------
def roll_up(
    store: Store, *, until: float, estimate: Estimator | None = None, max_hours: int | None = None
) -> dict[str, int]:
    """Roll up what is complete at ``until``: late windows, then hours, then days (module docstring).

    ``estimate`` gives each roll-up's ``estimated_accuracy`` from its merged window (None: no estimate);
    ``max_hours`` bounds the hours rolled in this pass (a long catch-up then spans several passes).
    Returns ``hour`` and ``day``: roll-up rows made; ``late``: late windows merged into rolled hours;
    ``more``: 1 when ``max_hours`` stopped the pass before ``until``. Nothing happens (all 0) while
    another pass holds the lease.
    """
    counts = {"hour": 0, "day": 0, "late": 0, "more": 0}
    lease = _acquire(store)
    if lease is None:
        log.info("roll-ups: another pass is running")
        return counts
    try:
        top = _top_id(store)
        counts["late"] = _late_step(store, lease, _cursors(store), top, estimate)
        counts["hour"], more = _hour_step(store, lease, until, top, estimate, max_hours)
        counts["more"] = int(more)
        counts["day"] = _day_step(store, lease, _cursors(store), estimate)
    except _LeaseLost:
        log.warning("roll-ups: the pass took longer than %.0f s and another one took over", LEASE_S)
    finally:
        _release(store, lease)
    return counts


def _roll(
    store: Store,
    lease: _Lease,
    query: Select[Any],
    where: tuple[str, float],
    estimate: Estimator | None,
    done: Callable[[Connection], None],
) -> int:
    """Each (device, model) group of ``query``'s parts (sorted by device, model) as one roll-up of period
    ``where[0]`` starting at ``where[1]``, upserted BATCH at a time; ``done`` runs in the last write."""
    made = 0
    rows: list[dict[str, Any]] = []
    with store.engine.connect() as conn:
        for parts in _groups(conn.execution_options(yield_per=BATCH).execute(query)):
            merged = _merge(parts)
            if merged is not None:
                rows.append(_row(merged, where[0], where[1], estimate))
            if len(rows) >= BATCH:
                with _writing(store, lease) as w:
                    made += _upsert(w, rows)
                rows = []
    with _writing(store, lease) as w:
        made += _upsert(w, rows)
        done(w)
    return made


def _next_start(store: Store, query: Select[Any], period_s: float) -> float | None:
    """The start of the period holding ``query``'s (a min over times) result, or None."""
    with store.engine.connect() as conn:
        t = conn.scalar(query)
    return None if t is None else math.floor(t / period_s) * period_s


def _hour_step(
    store: Store,
    lease: _Lease,
    until: float,
    top: int,
    estimate: Estimator | None,
    max_hours: int | None,
) -> tuple[int, bool]:
    """Roll up the complete hours after the cursor (windows with ``id <= top``); (rows made, stopped early)."""
    target = math.floor(until / HOUR_S) * HOUR_S
    cursor = _cursors(store).get("hour")
    first = select(func.min(Window.end)).where(Window.id <= top)

    def next_hour(after: float | None) -> float | None:
        return _next_start(store, first if after is None else first.where(Window.end >= after), HOUR_S)

    made = hours = 0
    h = next_hour(cursor)
    while h is not None and h < target:
        if max_hours is not None and hours >= max_hours:
            return made, True
        q = (
            _raw_parts()
            .where(Window.end >= h, Window.end < h + HOUR_S, Window.id <= top)
            .order_by(Window.device, Window.model_sha256)
        )
        made += _roll(store, lease, q, ("hour", h), estimate, _cursor_to("hour", h + HOUR_S))
        hours += 1
        h = next_hour(h + HOUR_S)
    if cursor is None or cursor < target:  # the hours left are empty
        with _writing(store, lease) as conn:
            _set_cursor(conn, "hour", target)
    return made, False


def _day_step(store: Store, lease: _Lease, cursors: dict[str, float], estimate: Estimator | None) -> int:
    """Roll up every day before the hour cursor's day, after the day cursor, from its hour roll-ups."""
    if "hour" not in cursors:
        return 0
    target = math.floor(cursors["hour"] / DAY_S) * DAY_S
    cursor = cursors.get("day")
    first = select(func.min(WindowRollup.start)).where(WindowRollup.period == "hour")

    def next_day(after: float | None) -> float | None:
        return _next_start(store, first if after is None else first.where(WindowRollup.start >= after), DAY_S)

    made = 0
    d = next_day(cursor)
    while d is not None and d < target:
        q = (
            _rollup_parts()
            .where(WindowRollup.period == "hour", WindowRollup.start >= d, WindowRollup.start < d + DAY_S)
            .order_by(WindowRollup.device, WindowRollup.model_sha256, WindowRollup.start)
        )
        made += _roll(store, lease, q, ("day", d), estimate, _cursor_to("day", d + DAY_S))
        d = next_day(d + DAY_S)
    if cursor is None or cursor < target:
        with _writing(store, lease) as conn:
            _set_cursor(conn, "day", target)
    return made


def _late_step(
    store: Store, lease: _Lease, cursors: dict[str, float], top: int, estimate: Estimator | None
) -> int:
    """Merge windows with ``S < id <= top`` that ended in rolled hours into them; S becomes ``top``.
    Returns how many windows were merged."""
    s = int(cursors.get(ID_CURSOR, 0))
    hour, day = cursors.get("hour"), cursors.get("day")
    merged = 0
    while s < top:
        rows: list[Any] = []
        if hour is not None:
            q = _raw_parts().where(Window.id > s, Window.id <= top, Window.end < hour).order_by(Window.id)
            with store.engine.connect() as conn:
                rows = list(conn.execute(q.limit(BATCH)))
        upper = int(rows[-1].id) if len(rows) == BATCH else top
        with _writing(store, lease) as conn:
            merged += _merge_late(conn, rows, day, estimate)
            _set_cursor(conn, ID_CURSOR, float(upper))
        s = upper
    return merged


def _merge_late(conn: Connection, rows: Sequence[Any], day: float | None, estimate: Estimator | None) -> int:
    """Add late windows (rows of _raw_parts) to their hours' roll-ups; rebuild rolled days they touch."""
    late: dict[tuple[str, str, float], list[_Part]] = defaultdict(list)
    for r in rows:
        if (w := _parse(r.payload)) is not None:
            late[(r.device, r.model_sha256, math.floor(r.end / HOUR_S) * HOUR_S)].append(
                _Part(w, 1, r.span_s)
            )
    if not late:
        return 0
    key = tuple_(WindowRollup.device, WindowRollup.model_sha256, WindowRollup.start)
    q = _rollup_parts().where(WindowRollup.period == "hour", key.in_(list(late)))
    have = {(r[0], r[1], r[5]): p for r in conn.execute(q) for p in _groups([r])}
    out = []
    for (device, sha, start), parts in late.items():
        m = _merge([*have.get((device, sha, start), []), *parts])
        if m is not None:
            out.append(_row(m, "hour", start, estimate))
    _upsert(conn, out)
    days = {(d, sha, math.floor(h / DAY_S) * DAY_S) for d, sha, h in late if day is not None and h < day}
    for device, sha, d in days:
        q = _rollup_parts().where(
            WindowRollup.device == device,
            WindowRollup.model_sha256 == sha,
            WindowRollup.period == "hour",
            WindowRollup.start >= d,
            WindowRollup.start < d + DAY_S,
        )
        for parts in _groups(conn.execute(q.order_by(WindowRollup.start))):
            if (m := _merge(parts)) is not None:
                _upsert(conn, [_row(m, "day", d, estimate)])
    return sum(len(p) for p in late.values())


# -- retention -----------------------------------------------------------------------------------------
def purge_windows(store: Store, *, keep_days: float, now: float) -> int:
    """Delete raw windows that ended more than ``keep_days`` before ``now`` and are in the hour roll-ups;
    returns how many. The newest window is always kept (SQLite would hand out its id again)."""
    if keep_days < 0:
        raise ValueError(f"keep_days must not be negative, got {keep_days}")
    cursors = _cursors(store)
    if "hour" not in cursors or ID_CURSOR not in cursors:
        return 0
    cutoff = min(now - keep_days * DAY_S, cursors["hour"])
    rolled = int(cursors[ID_CURSOR])
    total = 0
    while True:
        with store.write() as conn:
            newest = select(func.max(Window.id)).scalar_subquery()
            ids = (
                select(Window.id)
                .where(Window.end < cutoff, Window.id <= rolled, Window.id < newest)
                .limit(PURGE_BATCH)
            )
            n = int(conn.execute(delete(Window).where(Window.id.in_(ids))).rowcount)
        total += n
        if n < PURGE_BATCH:
            return total


# -- reading -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesPoint:
    """A raw window, or one hour or day of a device's windows on one model."""

    start: float
    end: float
    model_sha256: str
    windows: int
    frames_inferred: int
    frames_failed: int
    frames_per_second: float | None
    """Inferred frames per second of window time (frames_inferred / the windows' summed span)."""
    confidence_mean: float | None
    estimated_accuracy: float | None
    latency_p50_ms: float | None
    """Median latency of the inference stage (else the first of capture, preprocess present)."""
    events: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Series:
    """A device's time series at one resolution, points sorted by start (then model)."""

    resolution: Resolution
    points: list[SeriesPoint]


def _payload() -> Any:
    return coerce(Window.payload, JSON)


def _p50(payload: Any) -> Any:
    return func.coalesce(*(payload[("latency_ms", s, "p50")].as_float() for s in LATENCY_ORDER))


def _ratio(n: float | None, d: float | None) -> float | None:
    return None if n is None or not d else n / d


def read_series(store: Store, device: str, since: float, until: float) -> Series:
    """``device``'s time series over ``[since, until)``.

    * ``until - since <= 6 h``: ``window`` resolution, each raw window that ended in the range (read from
      columns, no payload parsing); its ``estimated_accuracy`` is ATC, ``atc_above / frames_inferred``.
    * up to 45 days: ``hour``; longer: ``day``. Points cover the whole UTC periods that overlap the
      range, one per period and model, ``end`` = start + period. Rolled periods are their roll-ups (with
      the roll-up's label-free ``estimated_accuracy``); the periods after the cursor are merged on the
      fly from raw windows (and, for days, hour roll-ups), so the newest period is on the chart too;
      their ``estimated_accuracy`` is ATC of the merged windows. A window stored after its hour was
      rolled up shows from the next :func:`roll_up` on.
    """
    if until - since <= RAW_UP_TO_S:
        return Series("window", _raw_points(store, device, since, until))
    period: Literal["hour", "day"] = "hour" if until - since <= HOURS_UP_TO_S else "day"
    p = PERIOD_S[period]
    lo, hi = math.floor(since / p) * p, math.ceil(until / p) * p
    cursors = _cursors(store)
    rolled = max(lo, min(cursors.get(period, lo), hi))
    points = _rollup_points(store, device, period, lo, rolled)
    points += _live_points(store, device, period, rolled, hi, cursors.get("hour"))
    return Series(period, sorted(points, key=lambda x: (x.start, x.model_sha256)))


def _raw_points(store: Store, device: str, since: float, until: float) -> list[SeriesPoint]:
    p = _payload()
    q = (
        select(
            Window.start,
            Window.end,
            Window.model_sha256,
            Window.frames_inferred,
            Window.frames_failed,
            Window.confidence_mean,
            Window.atc_above,
            _p50(p),
            p["events"],
        )
        .where(Window.device == device, Window.end >= since, Window.end < until)
        .order_by(Window.end, Window.model_sha256)
    )
    with store.engine.connect() as conn:
        rows = list(conn.execute(q))
    return [
        SeriesPoint(
            start=r[0],
            end=r[1],
            model_sha256=r[2],
            windows=1,
            frames_inferred=int(r[3]),
            frames_failed=int(r[4]),
            frames_per_second=_ratio(r[3], r[1] - r[0]),
            confidence_mean=r[5],
            estimated_accuracy=_ratio(r[6], r[3]),
            latency_p50_ms=r[7],
            events=dict(r[8] or {}),
        )
        for r in rows
    ]


def _rollup_points(store: Store, device: str, period: str, lo: float, hi: float) -> list[SeriesPoint]:
    if hi <= lo:
        return []
    r = WindowRollup
    p = coerce(r.payload, JSON)
    q = select(
        r.start,
        r.model_sha256,
        r.windows,
        r.frames_inferred,
        r.frames_failed,
        r.span_s,
        r.confidence_mean,
        r.estimated_accuracy,
        _p50(p),
        p["events"],
    ).where(r.device == device, r.period == period, r.start >= lo, r.start < hi)
    with store.engine.connect() as conn:
        rows = list(conn.execute(q))
    return [
        SeriesPoint(
            start=x[0],
            end=x[0] + PERIOD_S[period],
            model_sha256=x[1],
            windows=int(x[2]),
            frames_inferred=int(x[3]),
            frames_failed=int(x[4]),
            frames_per_second=_ratio(x[3], x[5]),
            confidence_mean=x[6],
            estimated_accuracy=x[7],
            latency_p50_ms=x[8],
            events=dict(x[9] or {}),
        )
        for x in rows
    ]


def _live_points(
    store: Store, device: str, period: str, lo: float, hi: float, hour_cursor: float | None
) -> list[SeriesPoint]:
    """Points of the periods in ``[lo, hi)`` that are not rolled up yet, merged from hour roll-ups (before
    the hour cursor) and raw windows (after it)."""
    if hi <= lo:
        return []
    p = PERIOD_S[period]
    split = lo if hour_cursor is None else min(max(lo, hour_cursor), hi)
    raw = _raw_parts().where(Window.device == device, Window.end >= split, Window.end < hi)
    hours = _rollup_parts().where(
        WindowRollup.device == device,
        WindowRollup.period == "hour",
        WindowRollup.start >= lo,
        WindowRollup.start < split,
    )
    buckets: dict[tuple[float, str], list[_Part]] = defaultdict(list)
    with store.engine.connect() as conn:
        rows = list(conn.execute(raw)) + (list(conn.execute(hours)) if period == "day" else [])
    for r in rows:
        if (w := _parse(r[4])) is not None:
            buckets[(math.floor(r[5] / p) * p, r[1])].append(_Part(w, int(r[2]), float(r[3])))
    points = []
    for (start, _), parts in buckets.items():
        if (m := _merge(parts)) is not None:
            points.append(_merged_point(m, start, start + p))
    return points


def _merged_point(part: _Part, start: float, end: float) -> SeriesPoint:
    w = part.window
    stage = next((s for s in (*LATENCY_ORDER, *w.latency_ms) if s in w.latency_ms), None)
    return SeriesPoint(
        start=start,
        end=end,
        model_sha256=w.model.sha256,
        windows=part.windows,
        frames_inferred=w.frames.inferred,
        frames_failed=w.frames.failed,
        frames_per_second=_ratio(w.frames.inferred, part.span_s),
        confidence_mean=w.confidence_mean,
        estimated_accuracy=_ratio(w.atc_above, w.frames.inferred),
        latency_p50_ms=None if stage is None else w.latency_ms[stage].p50,
        events=dict(w.events),
    )


def read_histograms(
    store: Store, device: str, since: float, until: float, model_sha256: str | None = None
) -> dict[str, Histogram]:
    """The exact merge of ``device``'s feature histograms over the windows that ended in ``[since, until)``
    on one model (default: the model of the newest window in the range): day roll-ups for whole rolled
    days inside the range, hour roll-ups for the other whole rolled hours, raw windows for the rest (and
    for windows stored after their hour was rolled up). A window whose bins differ is left out (logged).
    Raw windows already purged are gone: a range edge inside a purged hour misses that hour's part.
    """
    sha = model_sha256 or _newest_model(store, device, since, until)
    if sha is None:
        return {}
    cursors = _cursors(store)
    hours = _whole(since, until, cursors.get("hour"), HOUR_S)
    days = _whole(since, until, cursors.get("day"), DAY_S) if hours else None
    r = WindowRollup
    rolled: list[Any] = [false()]
    raw: list[Any] = [and_(Window.end >= since, Window.end < until)]
    if hours:
        (h0, h1), (d0, d1) = hours, days or (hours[0], hours[0])
        rolled = [
            and_(r.period == "day", r.start >= d0, r.start < d1),
            and_(
                r.period == "hour", or_(and_(r.start >= h0, r.start < d0), and_(r.start >= d1, r.start < h1))
            ),
        ]
        pending = and_(Window.id > int(cursors.get(ID_CURSOR, 0)), Window.end >= h0, Window.end < h1)
        raw = [
            and_(Window.end >= since, Window.end < h0),
            and_(Window.end >= h1, Window.end < until),
            pending,
        ]
    rq = select(coerce(r.payload, JSON)["histograms"]).where(
        r.device == device, r.model_sha256 == sha, or_(*rolled)
    )
    wq = select(_payload()["histograms"]).where(
        Window.device == device, Window.model_sha256 == sha, or_(*raw)
    )
    with store.engine.connect() as conn:
        return _sum_histograms(itertools.chain(conn.scalars(rq), conn.scalars(wq)))


def _whole(since: float, until: float, cursor: float | None, p: float) -> tuple[float, float] | None:
    """The whole periods of length ``p`` inside ``[since, until)`` that are rolled up (before ``cursor``)."""
    if cursor is None:
        return None
    a, b = math.ceil(since / p) * p, min(math.floor(until / p) * p, cursor)
    return (a, b) if a < b else None


def _sum_histograms(docs: Iterable[dict[str, Any] | None]) -> dict[str, Histogram]:
    out: dict[str, Histogram] = {}
    for doc in docs:
        for name, h in (doc or {}).items():
            hist = Histogram.model_validate(h)
            if name not in out:
                out[name] = hist
            elif out[name].edges == hist.edges:
                out[name] = merge_histograms(out[name], hist)
            else:
                log.warning("read_histograms: a %s histogram with other bins is left out", name)
    return out


def _newest_model(store: Store, device: str, since: float, until: float) -> str | None:
    """The model of the device's newest window that ended in the range (raw or rolled up)."""
    raw = (
        select(Window.model_sha256, Window.end)
        .where(Window.device == device, Window.end >= since, Window.end < until)
        .order_by(Window.end.desc())
        .limit(1)
    )
    r = WindowRollup
    rolled = (
        select(r.model_sha256, r.start)
        .where(r.device == device, r.period == "hour", r.start >= math.floor(since / HOUR_S) * HOUR_S)
        .where(r.start < until)
        .order_by(r.start.desc())
        .limit(1)
    )
    with store.engine.connect() as conn:
        a, b = conn.execute(raw).first(), conn.execute(rolled).first()
    if a is None or (b is not None and b[1] > a[1]):
        return None if b is None else str(b[0])
    return str(a[0])
