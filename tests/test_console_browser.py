"""The console in a real browser (Debian's chromium driven by Playwright): log in, the fleet table,
device charts, keyboard labelling, promoting a canary with its confirmation, a viewer refused, live
refresh, and the screenshots in docs/images (copied there when ``EDGEFLEET_SCREENSHOTS=1``)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.console_fixtures import *  # noqa: F403
from tests.console_fixtures import Seeded
from trainer.store import console_queries as q

CHROMIUM = Path("/usr/bin/chromium")
DOCS_IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(CHROMIUM.exists(), "chromium (Debian package)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - the dev extra installs it
        require(False, "the playwright Python package")
        raise
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _page(browser: Any, base: str) -> Any:
    ctx = browser.new_context(base_url=base, viewport={"width": 1366, "height": 900})
    ctx.set_default_timeout(TIMEOUT_MS)
    return ctx.new_page()


def _login(page: Any, seed: Seeded, role: str, start: str = "/fleet") -> None:
    """Log in through the form (the console redirects to it and back to ``start``)."""
    username, password = seed.seed.users[role]
    page.goto(start)
    assert "/login" in page.url
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_url(re.compile(re.escape(start) + r"$"))
    assert page.locator("form.who span").inner_text().startswith(username)


def _device_names(page: Any) -> list[str]:
    return [
        str(n)
        for n in page.locator("tbody tr[data-device]").evaluate_all("rs => rs.map(r => r.dataset.device)")
    ]


def test_fleet_table_counts_sort_and_search(browser: Any, live_console: tuple[str, Seeded]) -> None:
    base, s = live_console
    page = _page(browser, base)
    _login(page, s, "viewer")
    names = _device_names(page)
    assert names == sorted(s.seed.devices) and len(names) == 12
    counts = q.state_counts(s.store, s.seed.fleet)
    for kind in ("state", "drift"):
        for state, n in counts[kind].items():
            assert page.locator(f"[data-count='{kind}-{state}']").inner_text() == str(n)
    assert page.locator("[data-count='drift-drift']").inner_text() == str(len(s.seed.drifting))
    assert int(page.locator("[data-count='state-offline']").inner_text()) == 3

    # sorting: the Device column again reverses; the State column puts offline devices first
    page.click("thead th a:has-text('Device')")
    page.wait_for_url(re.compile(r"sort=device&order=desc"))
    assert _device_names(page) == sorted(s.seed.devices, reverse=True)
    page.click("thead th a:has-text('State')")
    page.wait_for_url(re.compile(r"sort=state&order=asc"))
    pills = page.locator("tbody tr[data-device] td:nth-child(2) .pill").all_inner_texts()
    assert pills == sorted(pills) and pills[:3] == ["offline"] * 3

    # the search box
    page.fill("input[name=search]", "cam-01")
    page.press("input[name=search]", "Enter")
    page.wait_for_url(re.compile(r"search=cam-01"))
    assert sorted(_device_names(page)) == ["cam-010", "cam-011"]
    assert page.locator("main p.muted").first.inner_text() == "2 devices"
    page.fill("input[name=search]", "no-such-device")
    page.press("input[name=search]", "Enter")
    page.wait_for_url(re.compile(r"search=no-such-device"))
    assert page.locator("tbody").inner_text().strip() == "No device matches."
    page.context.close()


def test_device_page_draws_its_charts(browser: Any, live_console: tuple[str, Seeded]) -> None:
    base, s = live_console
    page = _page(browser, base)
    _login(page, s, "viewer")
    device = s.seed.drifting[0]
    page.click(f"tr[data-device='{device}'] a[href='/devices/{device}']")
    page.wait_for_url(f"**/devices/{device}")
    assert page.locator("h1").inner_text().startswith(device)
    assert "drift" in page.locator("h1 .pill").all_inner_texts()
    series = page.locator("#chart-accuracy svg path.series[data-series='estimated']")
    assert series.count() == 1, page.locator("#chart-accuracy").inner_html()[:3000]
    assert int(series.get_attribute("data-points") or 0) > 0
    box = series.bounding_box()
    assert box is not None and box["width"] > 100  # drawn across the plot, not collapsed
    for chart in ("#chart-fps", "#chart-latency"):
        assert int(page.locator(f"{chart} svg path.series").first.get_attribute("data-points") or 0) > 0
    hists = page.locator("#histograms section.hist svg")
    assert hists.count() >= 2
    for i in range(hists.count()):
        assert hists.nth(i).locator("rect.bar").count() > 0
    page.context.close()


def test_keyboard_labelling(browser: Any, live_console: tuple[str, Seeded]) -> None:
    base, s = live_console
    assert s.store.labels() == []
    page = _page(browser, base)
    _login(page, s, "labeller", "/labelling")
    samples = page.locator("#queue article.sample")
    assert samples.count() >= 3
    ids = [int(x) for x in samples.evaluate_all("els => els.slice(0, 3).map(e => e.dataset.sample)")]
    classes = page.locator("#queue article.sample.current button[data-label]").evaluate_all(
        "bs => bs.map(b => b.dataset.label)"
    )
    assert len(classes) >= 2
    before = page.locator("#queue-total").inner_text()
    total = int(before.split()[0])
    for n, key in enumerate(("1", "2", "1"), start=1):
        page.keyboard.press(key)
        # one request at a time: the sample is saved and marked done before the next key
        page.wait_for_function(
            "n => document.querySelectorAll('#queue article.sample.done').length >= n", arg=n
        )
    # every keypress is saved in turn: the first three samples are done with the expected labels
    expected = [classes[0], classes[1], classes[0]]
    for i, (sid, label) in enumerate(zip(ids, expected, strict=True)):
        el = page.locator(f"#queue article.sample[data-sample='{sid}']")
        el.locator(".result").filter(has_text=f"labelled {label}").wait_for()
        assert "done" in (el.get_attribute("class") or ""), i
    assert page.locator("#queue-total").inner_text() == f"{total - 3} to label"
    assert "current" in (samples.nth(3).get_attribute("class") or "")
    labels = s.store.labels()
    assert sorted((lb.sample_id, lb.label) for lb in labels) == sorted(zip(ids, expected, strict=True))
    assert {lb.labeller for lb in labels} == {"labeller1"}
    page.context.close()


def test_operator_promotes_the_canary(browser: Any, live_console: tuple[str, Seeded]) -> None:
    base, s = live_console
    rid = s.seed.rollout_id
    page = _page(browser, base)
    _login(page, s, "operator", f"/rollouts/{rid}")
    assert page.locator("#rollout-state").inner_text() == "active"
    dialogs: list[str] = []

    def accept(d: Any) -> None:
        dialogs.append(d.message)
        d.accept()

    page.on("dialog", accept)
    page.fill("form.decide input[name=reason]", "canary holds up in the shop")
    page.click("form.decide button[value=promote]")
    page.locator("#rollout-state", has_text="promoted").wait_for()
    assert len(dialogs) == 1 and dialogs[0].startswith("promote this rollout?")
    assert "canary holds up in the shop" in dialogs[0]
    assert page.locator("form.decide").count() == 0  # decided: no buttons any more
    assert "operator1" in page.locator("#decisions").inner_text()

    page.click("header nav a:has-text('Audit log')")
    page.wait_for_url("**/audit")
    row = page.locator("tr[data-action='rollout.promoted']")
    assert row.count() >= 1
    cells = row.first.locator("td").all_inner_texts()
    assert cells[1] == "operator1" and cells[3] == f"rollout/{rid}", cells
    assert "canary holds up in the shop" in cells[4]
    page.context.close()


def test_viewer_is_refused(browser: Any, live_console: tuple[str, Seeded]) -> None:
    base, s = live_console
    rid = s.seed.rollout_id
    page = _page(browser, base)
    _login(page, s, "viewer", f"/rollouts/{rid}")
    assert page.locator("form.decide").count() == 0
    assert "needs the operator role" in page.locator("main").inner_text()

    page.goto("/labelling")
    assert "needs the labeller role" in page.locator("main").inner_text()
    buttons = page.locator("#queue button[data-label], #queue button[data-flag]")
    assert buttons.count() > 0
    assert all(buttons.evaluate_all("bs => bs.map(b => b.disabled)"))
    page.keyboard.press("1")  # the keyboard does not get around the role either
    page.locator("#queue article.sample.current .result", has_text="labeller role").wait_for()
    assert s.store.labels() == []

    status = page.evaluate(
        """async (rid) => {
            const r = await fetch(`/api/v1/rollouts/${rid}/promote`, {
                method: "POST", credentials: "same-origin",
                headers: {"Content-Type": "application/json", "X-CSRF-Token": document.body.dataset.csrf},
                body: JSON.stringify({reason: "a viewer tries anyway"}),
            });
            return r.status;
        }""",
        rid,
    )
    assert status == 403
    assert page.evaluate("document.body.dataset.csrf")  # the token was there: the role refused it
    assert next(r for r in s.store.rollouts() if r.id == rid).state == "active"
    page.context.close()


def test_fleet_page_refreshes_itself(browser: Any, live_console: tuple[str, Seeded]) -> None:
    base, s = live_console
    assert s.ctx.refresh_s == 2.0  # the live_console fixture's pace
    page = _page(browser, base)
    _login(page, s, "viewer")
    assert page.locator("body").get_attribute("data-refresh-s") == "2.0"
    device = next(d for d in s.seed.devices if d not in s.seed.drifting)
    pill = page.locator(f"tr[data-device='{device}'] td:nth-child(5) .pill")
    assert pill.inner_text() != "drift"
    drifting = int(page.locator("[data-count='drift-drift']").inner_text())
    page.evaluate("window.__same_page = true")

    old = q.device_health(s.store, device)
    assert old is not None
    row = q.HealthRow(
        model_sha256=old.model_sha256,
        drift_state="drift",
        reference=old.reference,
        estimated_accuracy=0.55,
        low=None,
        high=None,
        method="calibrated",
        labels=0,
        frames_per_second=old.frames_per_second,
        confidence_mean=0.4,
    )
    q.put_device_health(s.store, s.seed.fleet, {device: row}, time.time())
    t0 = time.monotonic()
    page.locator(f"tr[data-device='{device}'] td:nth-child(5) .pill", has_text="drift").wait_for(
        timeout=2 * 2_000 + 2_000
    )
    assert time.monotonic() - t0 < 6.0
    assert page.locator("[data-count='drift-drift']").inner_text() == str(drifting + 1)
    assert page.evaluate("window.__same_page") is True  # updated in place, not reloaded
    assert page.locator("#refreshed").inner_text().startswith("live: updated")
    page.context.close()


def test_screenshots(browser: Any, live_console: tuple[str, Seeded], tmp_path: Path) -> None:
    """Full-page screenshots of each page for docs/console.md, at 1366x900; copied into docs/images
    when EDGEFLEET_SCREENSHOTS=1 (``EDGEFLEET_SCREENSHOTS=1 pytest tests/test_console_browser.py``)."""
    base, s = live_console
    rid = s.seed.rollout_id
    shots = {
        "fleet": ("operator", "/fleet"),
        "device": ("operator", f"/devices/{s.seed.drifting[0]}"),
        "models": ("operator", "/models"),
        "rollout": ("operator", f"/rollouts/{rid}"),
        "alerts": ("operator", "/alerts"),
        "audit": ("operator", "/audit"),
        "labelling": ("labeller", "/labelling"),
    }
    pages: dict[str, Any] = {}
    for name, (role, url) in shots.items():
        if role not in pages:
            pages[role] = _page(browser, base)
            _login(pages[role], s, role)
        page = pages[role]
        page.goto(url)
        page.wait_for_load_state("networkidle")
        # lazy images below the fold would be blank in a full-page shot: load them all first
        page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
        page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("main h1").count() == 1, name
        assert page.locator("main h1").inner_text() not in ("403", "404", "500", "503"), name
        out = tmp_path / f"console-{name}.png"
        page.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 10_000, name
    for page in pages.values():
        page.context.close()
    if os.environ.get("EDGEFLEET_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        for name in shots:
            shutil.copyfile(tmp_path / f"console-{name}.png", DOCS_IMAGES / f"console-{name}.png")
