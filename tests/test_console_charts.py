"""The console's inline SVG charts: well-formed, counted, escaped, and never failing on empty input."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from trainer.console.charts import (
    NO_DATA,
    Band,
    LineSeries,
    Marker,
    histogram_chart,
    line_chart,
    nice_ticks,
    percent,
    sparkline,
)

NS = {"svg": "http://www.w3.org/2000/svg"}
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
HOSTILE = "<script>alert('x')</script> & \"cam\""


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("role") == "img" and root.get("aria-label")
    return root


def _classes(el: ET.Element) -> list[str]:
    return (el.get("class") or "").split()


def _series_paths(root: ET.Element) -> dict[str, ET.Element]:
    return {p.get("data-series", ""): p for p in root.iterfind(".//{*}path") if "series" in _classes(p)}


def _texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iterfind(".//{*}text")]


def _minutes(values: list[float | None], start: float = T0) -> list[tuple[float, float | None]]:
    return [(start + 60 * i, v) for i, v in enumerate(values)]


def test_series_paths_count_points_and_split_at_gaps() -> None:
    acc = LineSeries("accuracy", _minutes([0.9, 0.91, None, 0.88, 0.87, None, None, 0.86]), "acc")
    conf = LineSeries("confidence", _minutes([0.8] * 5), "conf", dashed=True)
    root = _parse(line_chart([acc, conf], title="Canary"))
    paths = _series_paths(root)
    assert set(paths) == {"accuracy", "confidence"}
    assert paths["accuracy"].get("data-points") == "5"
    assert paths["accuracy"].get("d", "").count("M") == 3
    assert paths["confidence"].get("data-points") == "5"
    assert paths["confidence"].get("d", "").count("M") == 1
    assert _classes(paths["confidence"]) == ["series", "conf", "dashed"]
    legend = [g.get("data-series") for g in root.iterfind(".//{*}g") if "legend-item" in _classes(g)]
    assert legend == ["accuracy", "confidence"]
    assert "Canary" in _texts(root)


def test_points_carry_tooltips_with_name_time_and_value() -> None:
    root = _parse(line_chart([LineSeries("acc", [(T0, 0.5)], "a")], y_format=percent))
    titles = ["".join(c.itertext()) for c in root.iterfind(".//{*}circle") for c in c.iterfind(".//{*}title")]
    assert titles == ["acc · 2023-11-14 22:13:20 UTC · 50%"]


def test_markers_are_drawn_with_their_labels() -> None:
    series = LineSeries("acc", _minutes([0.9] * 60), "acc")
    markers = [
        Marker(T0 + 600, "canary start", "canary"),
        Marker(T0 + 3000, "promote", "promote"),
        Marker(T0 + 10 * 86400, "far away", "abort"),
    ]
    root = _parse(line_chart([series], markers=markers, x_range=(T0, T0 + 3540)))
    groups = [g for g in root.iterfind(".//{*}g") if "marker" in _classes(g)]
    labels = ["".join(t.itertext()) for g in groups for t in g.iterfind(".//{*}text")]
    assert labels == ["canary start", "promote"]  # the one outside x_range is left out
    assert [_classes(g)[1] for g in groups] == ["canary", "promote"]


def test_markers_widen_the_automatic_time_range() -> None:
    series = LineSeries("acc", _minutes([0.9] * 10), "acc")
    root = _parse(line_chart([series], markers=[Marker(T0 + 86400, "drift", "drift")]))
    assert "drift" in _texts(root)


def test_bands_and_intervals() -> None:
    series = LineSeries(
        "acc",
        _minutes([0.9, 0.9, 0.9, 0.9]),
        "acc",
        interval=[(T0, 0.85, 0.95), (T0 + 60, 0.86, 0.94), (T0 + 120, None, 0.9), (T0 + 180, 0.8, 0.99)],
    )
    bands = [Band(T0 + 60, T0 + 120, -math.inf, math.inf, "canary-window", "canary"), Band(0, 1, 0, 1, "x")]
    root = _parse(line_chart([series], bands=bands))
    area = next(p for p in root.iterfind(".//{*}path") if "interval" in _classes(p))
    assert area.get("d", "").count("M") == 2 and area.get("d", "").count("Z") == 2
    rects = [r for r in root.iterfind(".//{*}rect") if "band" in _classes(r)]
    assert [_classes(r)[1] for r in rects] == ["canary-window", "x"]
    assert "canary" in _texts(root)


@pytest.mark.parametrize("y_range", [(0.0, 1.0), (0.5, 1.0), (0.7, 0.95), (-3.0, 17.0), (0.0, 0.1234)])
def test_y_ticks_stay_within_a_given_range(y_range: tuple[float, float]) -> None:
    series = LineSeries("acc", _minutes([0.2, 0.8, 2.0]), "acc")  # values outside are clamped
    root = _parse(line_chart([series], y_range=y_range))
    axis = next(g for g in root.iterfind(".//{*}g") if _classes(g) == ["axis", "y"])
    ticks = [float(g.get("data-y", "nan")) for g in axis if "tick" in _classes(g)]
    assert 4 <= len(ticks) <= 6
    assert all(y_range[0] <= t <= y_range[1] for t in ticks)


def test_nice_ticks_give_four_to_six_round_values() -> None:
    for lo, hi in [(0, 1), (0.83, 0.97), (-5, 1234), (1e-6, 3e-6), (3, 3), (1.7e9, 1.7e9 + 7)]:
        for extend in (False, True):
            ticks, y0, y1 = nice_ticks(lo, hi, extend=extend)
            assert 4 <= len(ticks) <= 6, (lo, hi, extend, ticks)
            assert ticks == sorted(ticks) and y0 <= ticks[0] and ticks[-1] <= y1
            if extend:
                assert y0 <= lo and hi <= y1


def test_time_labels_follow_the_span() -> None:
    short = _parse(line_chart([LineSeries("a", _minutes([1.0] * 120), "a")]))
    long = _parse(line_chart([LineSeries("a", [(T0, 1.0), (T0 + 6 * 86400, 2.0)], "a")]))

    def x_labels(root: ET.Element) -> list[str]:
        axis = next(g for g in root.iterfind(".//{*}g") if _classes(g) == ["axis", "x"])
        return ["".join(t.itertext()) for t in axis.iterfind(".//{*}text")]

    assert x_labels(short) and all(len(s) == 5 and s[2] == ":" for s in x_labels(short))
    assert x_labels(long) and all(len(s) == 5 and s[2] == "-" for s in x_labels(long))
    assert "11-15" in x_labels(long)


def test_hostile_names_are_escaped() -> None:
    series = LineSeries(HOSTILE, _minutes([1.0, 2.0]), HOSTILE)
    svg = line_chart(
        [series], markers=[Marker(T0, HOSTILE, "m")], bands=[Band(T0, T0 + 1, 0, 1, "b", HOSTILE)]
    )
    assert "<script>" not in svg
    root = _parse(svg)
    assert _series_paths(root)[HOSTILE].get("data-series") == HOSTILE
    assert _texts(root).count(HOSTILE) == 2  # marker label, band label
    legend = next(g for g in root.iterfind(".//{*}g") if "legend-item" in _classes(g))
    assert legend.findtext("{*}title") == HOSTILE  # the label itself is shortened to fit
    assert HOSTILE in (root.get("aria-label") or "")
    hist = histogram_chart([1, 2], [0, 1, 2], title=HOSTILE)
    assert "<script>" not in hist and HOSTILE in _texts(_parse(hist))


def test_characters_xml_forbids_do_not_break_the_document() -> None:
    name = "cam\x00\x1b\ud800-7"
    root = _parse(line_chart([LineSeries(name, _minutes([1.0]), "a")]))
    assert list(_series_paths(root)) == ["cam\ufffd\ufffd\ufffd-7"]


@pytest.mark.parametrize(
    "series",
    [
        [],
        [LineSeries("a", [], "a")],
        [LineSeries("a", _minutes([None, None]), "a")],
        [LineSeries("a", [(T0, math.nan), (math.inf, 1.0)], "a")],
    ],
)
def test_empty_line_chart_says_no_data(series: list[LineSeries]) -> None:
    root = _parse(line_chart(series, title="Accuracy", markers=[Marker(T0, "promote", "p")]))
    assert NO_DATA in _texts(root)
    assert not _series_paths(root)


def test_output_is_deterministic() -> None:
    series = [LineSeries("acc", _minutes([0.91234567, None, 0.7]), "acc")]
    assert line_chart(series) == line_chart(list(series))
    assert histogram_chart([3, 1], [0.0, 0.5, 1.0]) == histogram_chart((3, 1), (0.0, 0.5, 1.0))


def test_coordinates_are_rounded_to_one_decimal() -> None:
    root = _parse(line_chart([LineSeries("acc", _minutes([0.123456, 0.654321, 0.999]), "acc")]))
    path = _series_paths(root)["acc"].get("d", "")
    numbers = path.replace("M", " ").replace("L", " ").split()
    assert numbers and all(len(n.partition(".")[2]) <= 1 for n in numbers)


def test_histogram_bars_and_outside_bins() -> None:
    observed = [10, 40, 30, 20, 0]
    edges = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    reference = [0.1, 0.3, 0.3, 0.2, 0.1]
    band = [(0.05, 0.15), (0.2, 0.35), (0.25, 0.35), (0.15, 0.25), (0.05, 0.15)]
    root = _parse(histogram_chart(observed, edges, reference=reference, band=band, title="Confidence"))
    bars = [r for r in root.iterfind(".//{*}rect") if "bar" in _classes(r)]
    assert [r.get("data-bin") for r in bars] == ["0", "1", "2", "3", "4"]
    outside = [r.get("data-bin") for r in bars if "outside" in _classes(r)]
    assert outside == ["1", "4"]  # 40% above 35%, 0% below 5%
    assert len([r for r in root.iterfind(".//{*}rect") if "ref-band" in _classes(r)]) == 5
    ref = next(p for p in root.iterfind(".//{*}path") if "reference" in _classes(p))
    assert ref.get("data-points") == "5"
    assert "2 outside" in (root.get("aria-label") or "")


def test_histogram_without_reference_marks_nothing_outside() -> None:
    root = _parse(histogram_chart([1, 2, 3], [0, 1, 2, 3]))
    bars = [r for r in root.iterfind(".//{*}rect") if "bar" in _classes(r)]
    assert len(bars) == 3 and not any("outside" in _classes(r) for r in bars)


@pytest.mark.parametrize("observed, edges", [([], []), ([], [0.0]), ([0, 0], [0, 1, 2])])
def test_empty_histogram_says_no_data(observed: list[float], edges: list[float]) -> None:
    assert NO_DATA in _texts(_parse(histogram_chart(observed, edges)))


def test_histogram_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="edges"):
        histogram_chart([1, 2], [0, 1])
    with pytest.raises(ValueError, match="band"):
        histogram_chart([1, 2], [0, 1, 2], band=[(0.1, 0.2)])


def test_sparkline() -> None:
    root = _parse(sparkline([1.0, 2.0, None, 3.0, 2.5]))
    line = next(root.iterfind(".//{*}path"))
    assert line.get("data-points") == "4" and line.get("d", "").count("M") == 2
    assert "last 2.5" in (root.get("aria-label") or "")
    empty = _parse(sparkline([None, None]))
    assert "empty" in _classes(empty) and not list(empty.iterfind(".//{*}path"))
    assert _parse(sparkline([5.0, 5.0])).get("width") == "120"


def test_a_long_series_keeps_every_point_in_its_line_but_thins_its_hover_points() -> None:
    from trainer.console.charts import MAX_POINT_MARKERS

    pts = [(T0 + 3600 * i, 0.5 + 0.001 * (i % 50)) for i in range(720)]  # 30 days, hourly
    root = _parse(line_chart([LineSeries("estimated", pts, "estimated")], y_range=(0.0, 1.0)))
    assert _series_paths(root)["estimated"].get("data-points") == "720"
    circles = [c for c in root.iterfind(".//{*}circle") if "point" in _classes(c)]
    assert 100 <= len(circles) <= MAX_POINT_MARKERS
    tips = ["".join(c.itertext()) for c in circles]
    assert "2023-12-14 21:13:20 UTC" in tips[-1]  # the newest point always has its tooltip
