"""Inline SVG charts for the fleet manager console: pure functions, standard library only.

Pages are rendered on the server, so charts are SVG strings too: the console works air-gapped with no
charting JavaScript. Output is deterministic (same input, same string; coordinates rounded to 0.1 px)
and well-formed XML. Every text is XML-escaped, since device and series names come from devices.
Values that are missing, not finite or beyond +-1e15 are gaps, never errors.

Only CSS class names are set, never colours, so the console's stylesheet themes every chart:

- every chart: ``chart`` (plus ``line-chart``, ``histogram`` or ``sparkline`` on the root, and
  ``empty`` when there is nothing to draw), ``plot-area``, ``chart-title``, ``no-data``,
  ``axis x``/``axis y``, ``tick``, ``grid``, ``tick-label``
- line charts: ``series {css_class}`` (+ ``dashed``), ``point {css_class}``,
  ``interval {css_class}``, ``band {css_class}``, ``band-label``, ``marker {css_class}``,
  ``marker-line``, ``marker-label``, ``legend``, ``legend-item``, ``legend-swatch {css_class}``
  (+ ``dashed``), ``legend-label``
- histograms: ``bar`` (+ ``outside`` where the observed share leaves the reference band),
  ``ref-band``, ``reference``
- sparklines: ``sparkline-line``, ``sparkline-last``, ``sparkline-none``

Lines are paths, so the stylesheet should give ``.series``, ``.reference`` and ``.sparkline-line``
``fill: none`` after any rule that fills a series' own ``css_class`` (used for its points and area too).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

NO_DATA = "no data in this range"
MAX_POINT_MARKERS = 180
"""At most this many hover points per series (the line itself keeps every point): a page stays small."""
_LIMIT = 1e15
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_MANTISSAS = (1.0, 2.0, 2.5, 5.0)
_FALLBACK_MANTISSAS = (1.5, 3.0, 4.0, 7.5)
_TIME_STEPS: tuple[int, ...] = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800)
_TIME_STEPS += tuple(h * 3600 for h in (6, 12, 24, 48, 168, 336, 672, 2184, 4368, 8736))
_DAY = 86400.0


def plain_number(value: float) -> str:
    """A short readable number (the default ``y_format``): ``0.85``, ``1250``, ``12,500``."""
    return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"


def percent(value: float) -> str:
    """A proportion as a percentage (``0.955`` -> ``95.5%``), for accuracy and share axes."""
    return f"{value * 100:.4g}%"


@dataclass(frozen=True)
class LineSeries:
    """One line: ``points`` are ``(unix seconds, value or None)``; ``None`` breaks the line (a gap).

    ``interval`` (``(unix seconds, low, high)``) is drawn as a translucent area behind the line, e.g. a
    per-point confidence interval; a missing bound breaks the area like a missing value.
    """

    name: str
    points: Sequence[tuple[float, float | None]]
    css_class: str
    dashed: bool = False
    interval: Sequence[tuple[float, float | None, float | None]] = ()


@dataclass(frozen=True)
class Marker:
    """A decision point drawn as a labelled vertical line (canary start, promote, abort, drift)."""

    x: float
    label: str
    css_class: str


@dataclass(frozen=True)
class Band:
    """A shaded rectangle in data coordinates; +-inf bounds span the whole axis (e.g. a time window)."""

    x0: float
    x1: float
    y0: float
    y1: float
    css_class: str
    label: str = ""


@dataclass(frozen=True)
class _Frame:
    """The plot area in pixels and the data ranges mapped onto it (values outside are clamped)."""

    left: float
    top: float
    right: float
    bottom: float
    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float) -> float:
        """Pixel column of data ``x``."""
        x = min(max(x, self.x0), self.x1)
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: float) -> float:
        """Pixel row of data ``y`` (SVG rows grow downwards)."""
        y = min(max(y, self.y0), self.y1)
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)


def _t(text: object) -> str:
    """XML-escaped text or attribute value; characters XML forbids become U+FFFD."""
    return escape(_XML_INVALID.sub("\ufffd", str(text)), quote=True)


def _n(value: float) -> str:
    """An SVG coordinate rounded to 0.1 (``12`` rather than ``12.0``; never ``-0``)."""
    s = f"{value:.1f}"
    s = s[:-2] if s.endswith(".0") else s
    return "0" if s == "-0" else s


def _finite(value: float | None) -> float | None:
    """``value`` as a float, or None when it is missing, not finite or too large to chart."""
    if value is None or isinstance(value, str):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and abs(v) <= _LIMIT else None


def _utc(t: float, fmt: str) -> str:
    """``t`` (unix seconds) formatted in UTC; ``?`` for times the platform cannot represent."""
    try:
        return time.strftime(fmt, time.gmtime(t))
    except (OverflowError, OSError, ValueError):
        return "?"


def _svg_open(kind: str, width: int, height: int, label: str, empty: bool = False) -> str:
    """The root element: fixed size, ``role="img"`` and an ``aria-label`` for screen readers."""
    classes = f"chart {kind}" + (" empty" if empty else "")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{classes}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_t(label)}">'
    )


def _title_text(title: str, x: float) -> list[str]:
    """The visible chart title (nothing when there is none)."""
    return [f'<text class="chart-title" x="{_n(x)}" y="14">{_t(title)}</text>'] if title else []


def _empty_chart(kind: str, width: int, height: int, title: str) -> str:
    """A chart frame saying there is nothing to draw, so a page never breaks on an empty range."""
    top = 22.0 if title else 4.0
    parts = [
        _svg_open(kind, width, height, f"{title or kind}: {NO_DATA}", empty=True),
        *_title_text(title, 4),
        f'<rect class="plot-area" x="4" y="{_n(top)}" width="{_n(width - 8)}" height="{_n(height - top - 4)}"/>',
        f'<text class="no-data" x="{_n(width / 2)}" y="{_n((top + height) / 2)}" text-anchor="middle">'
        f"{NO_DATA}</text>",
        "</svg>",
    ]
    return "\n".join(parts)


def _pad_range(lo: float, hi: float) -> tuple[float, float]:
    """An ordered, non-empty range: a single value gets room around it."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi - lo <= abs(hi) * 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def nice_ticks(lo: float, hi: float, *, extend: bool = False) -> tuple[list[float], float, float]:
    """4-6 round tick values for ``[lo, hi]`` and the axis range they belong to.

    Steps are 1, 2, 2.5 or 5 x 10^k (1.5, 3, 4 or 7.5 x 10^k only when none of those gives 4-6 ticks).
    Without ``extend`` every tick lies within ``[lo, hi]`` and the range stays; with it (auto ranges)
    the range grows to the outer ticks so the axis starts and ends on a label.
    """
    lo, hi = _pad_range(lo, hi)
    exp0 = math.floor(math.log10((hi - lo) / 5))
    best: tuple[tuple[bool, bool, int, float], int, int, int] | None = None
    for exp in range(exp0 - 1, exp0 + 2):
        for mantissa in _MANTISSAS + _FALLBACK_MANTISSAS:
            step = mantissa * 10.0**exp
            if extend:
                first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
            else:
                first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
            count = last - first + 1
            key = (not 4 <= count <= 6, mantissa in _FALLBACK_MANTISSAS, abs(count - 5), step)
            if best is None or key < best[0]:
                best = (key, exp, first, last)
    assert best is not None
    (*_, step), exp, first, last = best
    ticks = [round(i * step, max(0, 3 - exp)) for i in range(first, last + 1)]
    if extend:
        return ticks, min(ticks[0], lo), max(ticks[-1], hi)
    return [min(max(t, lo), hi) for t in ticks], lo, hi


def _y_axis(frame: _Frame, ticks: Sequence[float], y_format: Callable[[float], str]) -> list[str]:
    """Horizontal grid lines with value labels left of the plot area."""
    parts = ['<g class="axis y">']
    for tick in ticks:
        y = _n(frame.py(tick))
        parts.append(
            f'<g class="tick" data-y="{_t(repr(tick))}">'
            f'<line class="grid" x1="{_n(frame.left)}" y1="{y}" x2="{_n(frame.right)}" y2="{y}"/>'
            f'<text class="tick-label" x="{_n(frame.left - 4)}" y="{y}" text-anchor="end" '
            f'dominant-baseline="middle">{_t(y_format(tick))}</text></g>'
        )
    parts.append("</g>")
    return parts


def _time_ticks(x0: float, x1: float, max_ticks: int) -> tuple[list[float], str]:
    """Round UTC times across ``[x0, x1]`` and their label format (HH:MM under 2 days, MM-DD beyond)."""
    span = x1 - x0
    step = next((float(s) for s in _TIME_STEPS if span / s <= max_ticks - 1), 0.0)
    if not step:
        step = _TIME_STEPS[-1] * math.ceil(span / (_TIME_STEPS[-1] * (max_ticks - 1)))
    first = math.ceil(x0 / step) * step
    ticks = [first + i * step for i in range(int((x1 - first) // step) + 1)]
    if step < 60:
        return ticks, "%H:%M:%S"
    if span < 2 * _DAY:
        return ticks, "%H:%M"
    return ticks, "%m-%d" if span < 366 * _DAY else "%Y-%m-%d"


def _x_axis(frame: _Frame, width: int) -> list[str]:
    """Vertical tick marks with UTC time labels under the plot area."""
    ticks, fmt = _time_ticks(frame.x0, frame.x1, max(2, width // 110))
    parts = ['<g class="axis x">']
    for tick in ticks:
        px = frame.px(tick)
        x = _n(px)
        # a label centred on a tick near the right edge would be cut off by the SVG's box
        anchor = "end" if width - px < 30 else "middle"
        parts.append(
            f'<g class="tick" data-x="{_n(tick)}">'
            f'<line class="grid" x1="{x}" y1="{_n(frame.top)}" x2="{x}" y2="{_n(frame.bottom)}"/>'
            f'<text class="tick-label" x="{x}" y="{_n(frame.bottom + 13)}" text-anchor="{anchor}">'
            f"{_t(_utc(tick, fmt))}</text></g>"
        )
    parts.append("</g>")
    return parts


def _clean_points(points: Sequence[tuple[float, float | None]]) -> list[tuple[float, float | None]]:
    """Points sorted by time; unusable times dropped, unusable values turned into gaps."""
    out: list[tuple[float, float | None]] = []
    for x, y in points:
        fx = _finite(x)
        if fx is not None:
            out.append((fx, _finite(y)))
    return sorted(out, key=lambda p: p[0])


def _clean_interval(
    interval: Sequence[tuple[float, float | None, float | None]],
) -> list[tuple[float, float, float] | None]:
    """Interval triples sorted by time as ``(x, low, high)``; None where a bound is missing (a gap)."""
    out: list[tuple[float, float, float] | None] = []
    for x, lo, hi in sorted(
        ((fx, _finite(lo), _finite(hi)) for x, lo, hi in interval if (fx := _finite(x)) is not None),
        key=lambda p: p[0],
    ):
        out.append((x, min(lo, hi), max(lo, hi)) if lo is not None and hi is not None else None)
    return out


@dataclass(frozen=True)
class _Clean:
    """A series with usable numbers only, as drawn."""

    series: LineSeries
    points: list[tuple[float, float | None]]
    interval: list[tuple[float, float, float] | None]


def _extents(
    clean: Sequence[_Clean], bands: Sequence[Band], markers: Sequence[Marker]
) -> tuple[list[float], list[float]]:
    """Every x and every y the automatic ranges must show."""
    xs = [x for c in clean for x, _ in c.points] + [p[0] for c in clean for p in c.interval if p]
    xs += [x for m in markers if (x := _finite(m.x)) is not None]
    ys = [y for c in clean for _, y in c.points if y is not None]
    ys += [v for c in clean for p in c.interval if p for v in p[1:]]
    ys += [v for b in bands for v in (_finite(b.y0), _finite(b.y1)) if v is not None]
    return xs, ys


def _line_frame(
    width: int, height: int, title: str, x_range: tuple[float, float], y_range: tuple[float, float]
) -> _Frame:
    """The line chart's plot area: room for y labels left, time labels and the legend below."""
    x0, x1 = min(x_range), max(x_range)
    if x1 - x0 <= 0:
        x0, x1 = x0 - 60, x1 + 60
    return _Frame(
        left=52, top=24 if title else 8, right=width - 12, bottom=height - 36,
        x0=x0, x1=x1, y0=y_range[0], y1=y_range[1],
    )  # fmt: skip


def _path_d(frame: _Frame, points: Sequence[tuple[float, float | None]]) -> str:
    """Path data for a polyline; each gap (None) starts a new subpath with ``M``."""
    out: list[str] = []
    pen_down = False
    for x, y in points:
        if y is None:
            pen_down = False
            continue
        out.append(f"{'L' if pen_down else 'M'}{_n(frame.px(x))} {_n(frame.py(y))}")
        pen_down = True
    return " ".join(out)


def _interval_d(frame: _Frame, interval: Sequence[tuple[float, float, float] | None]) -> str:
    """Path data for closed areas between low and high bounds, one per unbroken run."""
    runs: list[list[tuple[float, float, float]]] = [[]]
    for p in interval:
        if p is None:
            runs.append([])
        else:
            runs[-1].append(p)
    shapes = []
    for run in (r for r in runs if r):
        upper = [f"{_n(frame.px(x))} {_n(frame.py(hi))}" for x, _, hi in run]
        lower = [f"{_n(frame.px(x))} {_n(frame.py(lo))}" for x, lo, _ in reversed(run)]
        shapes.append("M" + " L".join(upper + lower) + " Z")
    return " ".join(shapes)


def _series_svg(frame: _Frame, c: _Clean, y_format: Callable[[float], str]) -> list[str]:
    """One series: its interval area, its line and hover points with tooltips (every point up to
    ``MAX_POINT_MARKERS``, evenly thinned beyond)."""
    s = c.series
    parts = []
    if any(c.interval):
        parts.append(
            f'<path class="interval {_t(s.css_class)}" data-series="{_t(s.name)}" '
            f'd="{_interval_d(frame, c.interval)}"/>'
        )
    known = [(x, y) for x, y in c.points if y is not None]
    dashed = " dashed" if s.dashed else ""
    parts.append(
        f'<path class="series {_t(s.css_class)}{dashed}" data-series="{_t(s.name)}" '
        f'data-points="{len(known)}" d="{_path_d(frame, c.points)}"/>'
    )
    step = max(1, math.ceil(len(known) / (MAX_POINT_MARKERS - 1)))  # the newest point comes on top
    for i, (x, y) in enumerate(known):
        if i % step and i != len(known) - 1:
            continue
        tip = f"{s.name} · {_utc(x, '%Y-%m-%d %H:%M:%S UTC')} · {y_format(y)}"
        parts.append(
            f'<circle class="point {_t(s.css_class)}" cx="{_n(frame.px(x))}" cy="{_n(frame.py(y))}" '
            f'r="2"><title>{_t(tip)}</title></circle>'
        )
    return parts


def _bands_svg(frame: _Frame, bands: Sequence[Band]) -> list[str]:
    """Shaded rectangles (clamped to the plot area); a label sits at the bottom left, clear of markers."""
    parts = []
    for band in bands:
        bounds = [_bound(v) for v in (band.x0, band.x1, band.y0, band.y1)]
        if any(math.isnan(v) for v in bounds):  # nothing sensible to shade
            continue
        xs = sorted(frame.px(v) for v in bounds[:2])
        ys = sorted(frame.py(v) for v in bounds[2:])
        tip = f"<title>{_t(band.label)}</title>" if band.label else ""
        parts.append(
            f'<rect class="band {_t(band.css_class)}" x="{_n(xs[0])}" y="{_n(ys[0])}" '
            f'width="{_n(xs[1] - xs[0])}" height="{_n(ys[1] - ys[0])}">{tip}</rect>'
        )
        if band.label:
            parts.append(
                f'<text class="band-label {_t(band.css_class)}" x="{_n(xs[0] + 3)}" '
                f'y="{_n(ys[1] - 4)}">{_t(band.label)}</text>'
            )
    return parts


def _bound(value: float) -> float:
    """A band bound for clamping: +-inf and huge values stay (clamped later), NaN stays NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _markers_svg(frame: _Frame, markers: Sequence[Marker]) -> list[str]:
    """Labelled vertical lines at decision points inside the time range; labels alternate rows."""
    inside = sorted(
        (m for m in markers if (x := _finite(m.x)) is not None and frame.x0 <= x <= frame.x1),
        key=lambda m: (m.x, m.label, m.css_class),
    )
    parts = []
    for i, m in enumerate(inside):
        x = frame.px(m.x)
        right_half = x > (frame.left + frame.right) / 2
        label_x, anchor = (x - 3, "end") if right_half else (x + 3, "start")
        tip = f"{m.label} · {_utc(m.x, '%Y-%m-%d %H:%M:%S UTC')}"
        parts.append(
            f'<g class="marker {_t(m.css_class)}" data-x="{_n(m.x)}"><title>{_t(tip)}</title>'
            f'<line class="marker-line" x1="{_n(x)}" y1="{_n(frame.top)}" x2="{_n(x)}" '
            f'y2="{_n(frame.bottom)}"/><text class="marker-label" x="{_n(label_x)}" '
            f'y="{_n(frame.top + 10 + 11 * (i % 2))}" text-anchor="{anchor}">{_t(m.label)}</text></g>'
        )
    return parts


def _legend_svg(series: Sequence[LineSeries], left: float, y: float) -> list[str]:
    """One row of swatches and names under the time axis (long names are shortened here only)."""
    parts = ['<g class="legend">']
    x = left
    for s in series:
        name = s.name if len(s.name) <= 32 else s.name[:31] + "…"
        dashed = " dashed" if s.dashed else ""
        parts.append(
            f'<g class="legend-item" data-series="{_t(s.name)}"><title>{_t(s.name)}</title>'
            f'<line class="legend-swatch {_t(s.css_class)}{dashed}" x1="{_n(x)}" y1="{_n(y - 4)}" '
            f'x2="{_n(x + 16)}" y2="{_n(y - 4)}"/>'
            f'<text class="legend-label" x="{_n(x + 20)}" y="{_n(y)}">{_t(name)}</text></g>'
        )
        x += 32 + 6.5 * len(name)
    parts.append("</g>")
    return parts


def _line_label(title: str, series: Sequence[LineSeries], frame: _Frame) -> str:
    """The aria-label: what is drawn and over which time range."""
    names = ", ".join(s.name for s in series)
    fmt = "%Y-%m-%d %H:%M"
    span = f"{_utc(frame.x0, fmt)} to {_utc(frame.x1, fmt)} UTC"
    return f"{title or 'Line chart'}: {names}; {span}"


def line_chart(
    series: Sequence[LineSeries],
    *,
    width: int = 720,
    height: int = 220,
    y_range: tuple[float, float] | None = None,
    y_format: Callable[[float], str] = plain_number,
    markers: Sequence[Marker] = (),
    bands: Sequence[Band] = (),
    title: str = "",
    x_range: tuple[float, float] | None = None,
) -> str:
    """Time series as an inline SVG line chart with gaps, intervals, bands, decision markers and a legend.

    ``x_range`` (unix seconds) fixes the time window, otherwise it spans the data and the markers;
    ``y_range`` fixes the value axis, otherwise it is rounded out from the data. Without any value to
    draw the chart says "no data in this range".
    """
    clean = [_Clean(s, _clean_points(s.points), _clean_interval(s.interval)) for s in series]
    xs, ys = _extents(clean, bands, markers)
    if not any(y is not None for c in clean for _, y in c.points):
        return _empty_chart("line-chart", width, height, title)
    if y_range is not None and _finite(y_range[0]) is not None and _finite(y_range[1]) is not None:
        ticks, y0, y1 = nice_ticks(*y_range)
    else:
        ticks, y0, y1 = nice_ticks(min(ys), max(ys), extend=True)
    usable_x = x_range is not None and all(_finite(v) is not None for v in x_range)
    frame = _line_frame(
        width, height, title, x_range if x_range and usable_x else (min(xs), max(xs)), (y0, y1)
    )
    parts = [
        _svg_open("line-chart", width, height, _line_label(title, series, frame)),
        *_title_text(title, frame.left),
        f'<rect class="plot-area" x="{_n(frame.left)}" y="{_n(frame.top)}" '
        f'width="{_n(frame.right - frame.left)}" height="{_n(frame.bottom - frame.top)}"/>',
        *_bands_svg(frame, bands),
        *_y_axis(frame, ticks, y_format),
        *_x_axis(frame, width),
        *(part for c in clean for part in _series_svg(frame, c, y_format)),
        *_markers_svg(frame, markers),
        *_legend_svg(series, frame.left, height - 6),
        "</svg>",
    ]
    return "\n".join(parts)


def _check_lengths(
    observed: Sequence[float],
    edges: Sequence[float],
    reference: Sequence[float] | None,
    band: Sequence[tuple[float, float]] | None,
) -> None:
    """Raise ValueError when the per-bin inputs disagree (a caller's bug, not data to chart)."""
    if observed and len(edges) != len(observed) + 1:
        raise ValueError(f"{len(edges)} edges for {len(observed)} bins (needs one more edge than bins)")
    for name, seq in (("reference", reference), ("band", band)):
        if seq is not None and len(seq) != len(observed):
            raise ValueError(f"{name} has {len(seq)} entries for {len(observed)} bins")


def _band_bin(band: Sequence[tuple[float, float]] | None, i: int) -> tuple[float, float] | None:
    """Bin ``i``'s ordered ``(low, high)`` reference band, or None when there is none."""
    if band is None:
        return None
    low, high = _finite(band[i][0]), _finite(band[i][1])
    return None if low is None or high is None else (min(low, high), max(low, high))


def _outside(props: Sequence[float], band: Sequence[tuple[float, float]] | None) -> list[bool]:
    """Per bin: does the observed proportion leave the reference band? (False without a band.)"""
    out = []
    for i, p in enumerate(props):
        limits = _band_bin(band, i)
        out.append(limits is not None and not (limits[0] - 1e-12 <= p <= limits[1] + 1e-12))
    return out


def _bars_svg(
    frame: _Frame,
    props: Sequence[float],
    counts: Sequence[float],
    edges: Sequence[float],
    band: Sequence[tuple[float, float]] | None,
) -> list[str]:
    """One bar per bin (equal widths, so open-ended or uneven bins stay readable), with tooltips."""
    parts = []
    for i, (p, outside) in enumerate(zip(props, _outside(props, band))):
        limits = _band_bin(band, i)
        x0, x1, y = frame.px(i), frame.px(i + 1), frame.py(p)
        tip = f"{plain_number(edges[i])} to {plain_number(edges[i + 1])}: {counts[i]:g} ({percent(p)})"
        if limits is not None:
            tip += f"; band {percent(limits[0])} to {percent(limits[1])}"
        parts.append(
            f'<rect class="bar{" outside" if outside else ""}" data-bin="{i}" x="{_n(x0 + 1)}" '
            f'y="{_n(y)}" width="{_n(max(x1 - x0 - 2, 0.5))}" height="{_n(frame.bottom - y)}">'
            f"<title>{_t(tip)}</title></rect>"
        )
    return parts


def _band_rects(frame: _Frame, band: Sequence[tuple[float, float]] | None, bins: int) -> list[str]:
    """The model's reference band as a shaded low-to-high range over each bin."""
    parts = []
    for i in range(bins):
        limits = _band_bin(band, i)
        if limits is not None:
            top, bottom = frame.py(limits[1]), frame.py(limits[0])
            parts.append(
                f'<rect class="ref-band" data-bin="{i}" x="{_n(frame.px(i))}" y="{_n(top)}" '
                f'width="{_n(frame.px(i + 1) - frame.px(i))}" height="{_n(bottom - top)}"/>'
            )
    return parts


def _reference_path(frame: _Frame, reference: Sequence[float] | None) -> list[str]:
    """The expected proportions as a step line across the bins (a gap where one is missing)."""
    if reference is None:
        return []
    steps: list[tuple[float, float | None]] = []
    for i, r in enumerate(reference):
        value = _finite(r)
        steps += [(float(i), value), (float(i + 1), value), (float(i + 1), None)]
    d = _path_d(frame, steps)
    return [f'<path class="reference" data-points="{len(reference)}" d="{d}"/>'] if d else []


def _edge_labels(frame: _Frame, edges: Sequence[float]) -> list[str]:
    """Labels under up to five evenly spaced bin edges."""
    bins = len(edges) - 1
    shown = sorted({round(k * bins / (min(bins, 4) or 1)) for k in range(min(bins, 4) + 1)})
    parts = ['<g class="axis x">']
    for i in shown:
        edge = _finite(edges[i])
        label = plain_number(edge) if edge is not None else "?"
        parts.append(
            f'<text class="tick-label" data-edge="{i}" x="{_n(frame.px(i))}" y="{_n(frame.bottom + 13)}" '
            f'text-anchor="middle">{_t(label)}</text>'
        )
    parts.append("</g>")
    return parts


def histogram_chart(
    observed: Sequence[float],
    edges: Sequence[float],
    *,
    reference: Sequence[float] | None = None,
    band: Sequence[tuple[float, float]] | None = None,
    width: int = 360,
    height: int = 180,
    title: str = "",
) -> str:
    """Observed counts as proportion bars against the model's reference (a step line) and band.

    Bars whose observed proportion leaves the band get the ``outside`` class, so drift shows per bin.
    ``reference`` holds expected proportions per bin, ``band`` ``(low, high)`` proportions per bin;
    lengths that disagree with ``observed`` raise ValueError, no observations give the "no data" frame.
    """
    _check_lengths(observed, edges, reference, band)
    counts = [max(_finite(c) or 0.0, 0.0) for c in observed]
    total = sum(counts)
    if total <= 0:
        return _empty_chart("histogram", width, height, title)
    props = [c / total for c in counts]
    tops = props + [v for v in (_finite(r) for r in reference or ()) if v is not None]
    tops += [limits[1] for i in range(len(props)) if (limits := _band_bin(band, i)) is not None]
    ticks, y0, y1 = nice_ticks(0.0, max(max(tops), 1e-9), extend=True)
    frame = _Frame(left=40, top=24 if title else 8, right=width - 8, bottom=height - 18,
                   x0=0, x1=len(props), y0=y0, y1=y1)  # fmt: skip
    outside = sum(_outside(props, band))
    label = f"{title or 'Histogram'}: {len(props)} bins, {total:g} observations"
    label += f", {outside} outside the reference band" if band is not None else ""
    parts = [
        _svg_open("histogram", width, height, label),
        *_title_text(title, frame.left),
        f'<rect class="plot-area" x="{_n(frame.left)}" y="{_n(frame.top)}" '
        f'width="{_n(frame.right - frame.left)}" height="{_n(frame.bottom - frame.top)}"/>',
        *_y_axis(frame, ticks, percent),
        *_bars_svg(frame, props, counts, edges, band),
        *_band_rects(frame, band, len(props)),
        *_reference_path(frame, reference),
        *_edge_labels(frame, edges),
        "</svg>",
    ]
    return "\n".join(parts)


def sparkline(values: Sequence[float | None], *, width: int = 120, height: int = 24) -> str:
    """A tiny trend line for a table cell: evenly spaced values, gaps at None, a dot on the last value."""
    ys = [_finite(v) for v in values]
    known = [y for y in ys if y is not None]
    if not known:
        return (
            f"{_svg_open('sparkline', width, height, 'no data', empty=True)}"
            f'<line class="sparkline-none" x1="1" y1="{_n(height / 2)}" x2="{_n(width - 1)}" '
            f'y2="{_n(height / 2)}"/></svg>'
        )
    lo, hi = _pad_range(min(known), max(known))
    frame = _Frame(left=2, top=2, right=width - 4, bottom=height - 2,
                   x0=0, x1=max(len(ys) - 1, 1), y0=lo, y1=hi)  # fmt: skip
    last_i = max(i for i, y in enumerate(ys) if y is not None)
    last = known[-1]
    label = (
        f"trend of {len(ys)} values: min {plain_number(min(known))}, max {plain_number(max(known))}, "
        f"last {plain_number(last)}"
    )
    d = _path_d(frame, [(float(i), y) for i, y in enumerate(ys)])
    return (
        f"{_svg_open('sparkline', width, height, label)}"
        f'<path class="sparkline-line" data-points="{len(known)}" d="{d}"/>'
        f'<circle class="sparkline-last" cx="{_n(frame.px(last_i))}" cy="{_n(frame.py(last))}" r="1.5"/>'
        "</svg>"
    )
