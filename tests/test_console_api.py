"""The console's REST API, auth and pages on a seeded store (SQLite and PostgreSQL): every GET route with
real ids, login-only access, the role matrix and CSRF on writes, the audit trail, bad input, a promote
racing an abort, the login rate limit and session cookie, and the database going away (503)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from tests.console_fixtures import *  # noqa: F403
from tests.console_fixtures import Seeded, login
from trainer.console.app import create_app
from trainer.console.auth import hash_password, new_token, token_hash
from trainer.console.deps import ConsoleContext
from trainer.fleet.webhooks import WebhookSettings
from trainer.store import Store, webhook_queue
from trainer.store import console_queries as q
from trainer.store.console_users import add_token, add_user

API = "/api/v1"
DAY = 86400.0


def _walk(routes: list[Any]) -> Iterator[Any]:
    """The app's routes, with included routers flattened (FastAPI nests them)."""
    for r in routes:
        if hasattr(r, "effective_candidates"):
            yield from _walk(r.effective_candidates())
        else:
            yield r


def routes(app: Any, method: str, api: bool) -> set[str]:
    """Path templates of ``method`` routes under /api/v1 (api) or of the pages (not api)."""
    out = set()
    for r in _walk(app.routes):
        path, methods = getattr(r, "path", None), getattr(r, "methods", None) or set()
        if path and method in methods and path.startswith(API + "/") == api:
            out.add(path)
    return out


def ids(s: Seeded) -> dict[str, Any]:
    sample = s.store.unlabelled_samples(limit=1)[0].id
    return {
        "device": s.seed.drifting[0],
        "sha256": s.seed.champion.sha256,
        "rollout_id": s.seed.rollout_id,
        "sample_id": sample,
    }


def api_gets(s: Seeded) -> dict[str, str]:
    """One concrete URL for every GET route of the API (a new route must be added here)."""
    templates = [
        "/openapi.json", "/me", "/fleets", "/devices", "/devices/{device}", "/devices/{device}/series",
        "/devices/{device}/histograms", "/devices/{device}/windows", "/models", "/models/{sha256}",
        "/models/{sha256}/card", "/releases", "/channels", "/rollouts", "/rollouts/{rollout_id}",
        "/samples", "/samples/{sample_id}", "/samples/{sample_id}/image", "/labelling/progress",
        "/alerts", "/webhooks/deliveries", "/audit",
    ]  # fmt: skip
    return {API + t: API + t.format(**ids(s)) for t in templates}


def writes(s: Seeded) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every state-changing route: name -> (URL, JSON body or form)."""
    i = ids(s)
    r, smp = i["rollout_id"], i["sample_id"]
    return {
        "promote": (f"{API}/rollouts/{r}/promote", {"reason": "canary looks good"}),
        "abort": (f"{API}/rollouts/{r}/abort", {"reason": "canary looks bad"}),
        "label": (f"{API}/samples/{smp}/label", {"label": "red"}),
        "flag": (f"{API}/samples/{smp}/flag", {"flag": "unusable"}),
        "decide": (f"/rollouts/{r}/decide", {"action": "promote", "reason": "by the form"}),
    }


def post(c: TestClient, name: str, url: str, body: dict[str, Any], csrf: str | None = None) -> Any:
    if name == "decide":  # the page form: CSRF in a form field
        return c.post(url, data={**body, **({"csrf": csrf} if csrf else {})}, follow_redirects=False)
    return c.post(url, json=body, headers={"X-CSRF-Token": csrf} if csrf else {})


def snapshot(s: Seeded) -> tuple[Any, ...]:
    """What a write could change: the rollout's state, labels, flags and the audit log (bar logins)."""
    state = next(r.state for r in s.store.rollouts() if r.id == s.seed.rollout_id)
    audit = tuple(e.action for e in s.store.audit_log() if not e.action.startswith("session."))
    return state, len(s.store.labels()), len(q.flagged_sample_ids(s.store)), audit


def rollout_state(s: Seeded) -> str:
    return next(r.state for r in s.store.rollouts() if r.id == s.seed.rollout_id)


def audit(s: Seeded, action: str, subject: str | None = None) -> list[Any]:
    return s.store.audit_log(action=action, subject=subject)


def details(entry: Any) -> dict[str, Any]:
    d = entry.details
    return dict(json.loads(d) if isinstance(d, str) else d)


def clean(r: Any) -> None:
    assert r.status_code != 500 and "Traceback" not in r.text, r.text


# -- 1. every GET route, with the seeded data ----------------------------------------------------------
def test_every_api_get_route_answers_a_viewer(seeded: Seeded) -> None:
    gets = api_gets(seeded)
    assert routes(seeded.app, "GET", api=True) == set(gets), "a GET route of the API has no test"
    card = Path(seeded.store.model(seeded.seed.champion.sha256).path) / "card.html"  # type: ignore[union-attr]
    card.write_text("<html><body>model card</body></html>")
    c = seeded.client("viewer")
    for template, url in gets.items():
        r = c.get(url)
        assert r.status_code == 200, (template, r.status_code, r.text)
    assert "model card" in c.get(gets[API + "/models/{sha256}/card"]).text
    image = c.get(gets[API + "/samples/{sample_id}/image"])
    assert image.headers["content-type"] == "image/jpeg" and image.content[:2] == b"\xff\xd8"
    assert c.get(f"{API}/me").json()["username"] == "viewer1"
    [fleet] = c.get(f"{API}/fleets").json()
    assert (fleet["fleet"], fleet["devices"], fleet["online"]) == ("shop", 12, 9)
    assert fleet["by_state"] == {"online": 9, "offline": 3} and fleet["by_drift"]["drift"] == 3
    assert {m["sha256"] for m in c.get(f"{API}/models").json()["items"]} == {
        seeded.seed.champion.sha256, seeded.seed.candidate.sha256}  # fmt: skip
    assert {ch["channel"] for ch in c.get(f"{API}/channels").json()} == {"stable", "canary"}
    assert c.get(f"{API}/releases").json()["total"] == 2
    assert [r["id"] for r in c.get(f"{API}/releases", params={"limit": 1, "offset": 1}).json()["items"]] == [
        1
    ]
    rollouts = c.get(f"{API}/rollouts").json()
    assert rollouts["total"] == 2 and rollouts["items"][0]["id"] == seeded.seed.rollout_id  # newest first
    detail = c.get(f"{API}/rollouts/{seeded.seed.rollout_id}").json()
    assert detail["state"] == "active" and len(detail["checks"]) == 4
    progress = c.get(f"{API}/labelling/progress").json()
    assert {p["device"]: p["samples"] for p in progress} == {d: 4 for d in seeded.seed.drifting}
    alerts = c.get(f"{API}/alerts").json()
    assert alerts["total"] == 3 and {a["device"] for a in alerts["items"]} == set(seeded.seed.drifting)
    assert c.get(f"{API}/audit", params={"action": "user.add"}).json()["total"] == 4


def test_device_list_filters_search_sort_and_pages(seeded: Seeded) -> None:
    c = seeded.client("viewer")

    def names(**params: Any) -> list[str]:
        return [d["device"] for d in c.get(f"{API}/devices", params=params).json()["items"]]

    page = c.get(f"{API}/devices").json()
    assert {d["artifact"] for d in page["items"]} == {"onnx-fp32"}  # the artifact each device runs
    assert page["total"] == 12 and len(page["items"]) == 12
    assert names(state="offline") == ["cam-003", "cam-007", "cam-011"]
    assert set(names(drift="drift")) == set(seeded.seed.drifting)
    assert names(search="cam-011") == ["cam-011"]
    best = c.get(f"{API}/devices", params={"sort": "estimated_accuracy", "order": "desc"}).json()["items"]
    accs = [d["estimated_accuracy"]["value"] for d in best]
    assert accs == sorted(accs, reverse=True) and accs[0] == 0.95 and accs[-1] == 0.35
    tail = c.get(f"{API}/devices", params={"limit": 5, "offset": 10}).json()
    assert (tail["total"], tail["limit"], tail["offset"]) == (12, 5, 10)
    assert [d["device"] for d in tail["items"]] == ["cam-010", "cam-011"]
    assert names(limit=3, offset=3) == ["cam-003", "cam-004", "cam-005"]


def test_series_histograms_windows_and_samples_agree(seeded: Seeded) -> None:
    c, device = seeded.client("viewer"), seeded.seed.drifting[0]
    until = time.time() + 120
    rng = {"since": until - DAY, "until": until}
    windows = c.get(f"{API}/devices/{device}/windows", params={**rng, "limit": 500}).json()
    assert windows["total"] == 360 == len(windows["items"])  # 6 hours of 60 s windows
    frames = sum(w["frames_inferred"] for w in windows["items"])
    assert frames == 360 * 12
    series = c.get(f"{API}/devices/{device}/series", params=rng).json()
    assert series["device"] == device and series["points"]
    assert sum(p["frames_inferred"] for p in series["points"]) == frames
    assert sum(p["windows"] for p in series["points"]) == 360
    hists = c.get(f"{API}/devices/{device}/histograms", params=rng).json()["histograms"]
    assert {"confidence", "brightness"} <= set(hists)
    for name, h in hists.items():
        assert sum(h["counts"]) == frames, name
        assert len(h["edges"]) == len(h["counts"]) + 1, name
    samples = c.get(f"{API}/samples", params={"status": "unlabelled"}).json()
    assert samples["total"] == 4 * len(seeded.seed.drifting)
    classes = set(seeded.seed.champion.manifest.labels)
    for smp in samples["items"]:
        assert smp["device"] in seeded.seed.drifting and smp["labels"] == [] and smp["flag"] is None
        assert smp["top"] and {t["label"] for t in smp["top"]} <= classes
    assert c.get(f"{API}/samples", params={"device": device}).json()["total"] == 4
    assert c.get(f"{API}/samples", params={"status": "labelled"}).json()["total"] == 0


# -- 2. nothing but /healthz without a login --------------------------------------------------------------
def test_anonymous_gets_nothing_but_healthz(seeded: Seeded) -> None:
    c = seeded.client(None)
    assert c.get("/healthz").status_code == 200
    for url in api_gets(seeded).values():
        r = c.get(url)
        assert r.status_code == 401 and "log in" in r.json()["detail"], (url, r.status_code)
    i = ids(seeded)
    pages = routes(seeded.app, "GET", api=False) - {"/login", "/healthz", "/", "/metrics"}
    assert c.get("/metrics").status_code == 404  # no service in this process (tests/test_fleet_metrics.py)
    assert {"/fleet", "/devices/{device}", "/rollouts/{rollout_id}", "/audit"} <= pages
    for template in pages:
        url = template.format(**i)
        r = c.get(url, params={"x": "1"}, follow_redirects=False)
        assert r.status_code == 303, (url, r.status_code)
        assert r.headers["location"].startswith("/login?next=") and "x%3D1" in r.headers["location"]
    assert c.get("/", follow_redirects=False).headers["location"] == "/fleet"
    for name, (url, body) in writes(seeded).items():
        assert post(c, name, url, body).status_code in (401, 303), name
    assert snapshot(seeded)[1:3] == (0, 0)


# -- 3. roles and CSRF on every write; 4. the audit trail --------------------------------------------------
ALLOWED = {"viewer": set(), "labeller": {"label", "flag"}}


@pytest.mark.parametrize("role", ["viewer", "labeller"])
def test_writes_above_a_role_are_refused_and_change_nothing(seeded: Seeded, role: str) -> None:
    c = seeded.client(role)
    csrf = seeded.csrf(c)
    for name, (url, body) in writes(seeded).items():
        if name in ALLOWED[role]:
            continue
        before = snapshot(seeded)
        r = post(c, name, url, body, csrf)
        assert r.status_code == 403, (role, name, r.status_code)
        assert snapshot(seeded) == before, (role, name)
    assert rollout_state(seeded) == "active"


def test_writes_need_the_sessions_csrf_token(seeded: Seeded) -> None:
    for role in ("labeller", "operator"):
        c = seeded.client(role)
        for name, (url, body) in writes(seeded).items():
            if role == "labeller" and name not in ALLOWED["labeller"]:
                continue
            for token in (None, "stale-" + new_token()):
                before = snapshot(seeded)
                r = post(c, name, url, body, token)
                assert r.status_code == 403 and "CSRF" in r.text, (role, name, token, r.status_code)
                assert snapshot(seeded) == before
    other = seeded.client("operator")  # another session's token is not this session's
    c = seeded.client("operator")
    url, body = writes(seeded)["abort"]
    assert post(c, "abort", url, body, seeded.csrf(other)).status_code == 403
    assert rollout_state(seeded) == "active"


def test_labeller_labels_and_flags_with_provenance_and_audit(seeded: Seeded) -> None:
    c = seeded.client("labeller")
    csrf = seeded.csrf(c)
    w = writes(seeded)
    sample = ids(seeded)["sample_id"]
    r = post(c, "label", *w["label"], csrf)
    assert r.status_code == 200 and r.json() == {"sample": sample, "label": "red", "labeller": "labeller1",
                                                 "stored": True}  # fmt: skip
    [stored] = seeded.store.labels([sample])
    assert (stored.label, stored.labeller) == ("red", "labeller1")
    [entry] = audit(seeded, "label.add", f"sample/{sample}")
    assert entry.actor == "labeller1" and details(entry)["label"] == "red"
    got = c.get(f"{API}/samples/{sample}").json()
    assert [lb["label"] for lb in got["labels"]] == ["red"]
    r = post(c, "flag", *w["flag"], csrf)
    assert r.status_code == 200 and r.json()["flag"] is not None
    [entry] = audit(seeded, "sample.flag", f"sample/{sample}")
    assert entry.actor == "labeller1"
    assert sample in q.flagged_sample_ids(seeded.store)
    assert c.get(f"{API}/samples", params={"status": "flagged"}).json()["total"] == 1


def test_operator_promotes_and_it_is_audited(seeded: Seeded) -> None:
    c = seeded.client("operator")
    r = post(c, "promote", *writes(seeded)["promote"], seeded.csrf(c))
    assert r.status_code == 200, r.text
    assert r.json()["decision"] == "promote" and r.json()["actor"] == "operator1"
    [entry] = audit(seeded, "rollout.promoted", f"rollout/{seeded.seed.rollout_id}")
    assert entry.actor == "operator1" and details(entry)["reason"] == "canary looks good"
    assert rollout_state(seeded) == "promoted"
    decisions = c.get(f"{API}/rollouts/{seeded.seed.rollout_id}").json()["decisions"]
    assert (decisions[-1]["actor"], decisions[-1]["action"]) == ("operator1", "rollout.promoted")
    again = post(c, "abort", *writes(seeded)["abort"], seeded.csrf(c))
    assert again.status_code == 409 and rollout_state(seeded) == "promoted"


def test_admin_decides_by_the_page_form(seeded: Seeded) -> None:
    c = seeded.client("admin")
    url, body = writes(seeded)["decide"]
    r = post(c, "decide", url, {**body, "action": "abort"}, seeded.csrf(c))
    assert r.status_code == 303 and r.headers["location"] == f"/rollouts/{seeded.seed.rollout_id}"
    assert rollout_state(seeded) == "rolled_back"
    [entry] = audit(seeded, "rollout.rolled_back", f"rollout/{seeded.seed.rollout_id}")
    assert entry.actor == "admin1" and details(entry)["reason"] == "by the form"
    assert post(c, "decide", url, body, seeded.csrf(c)).status_code == 409


def test_api_token_needs_no_csrf_and_keeps_its_role(seeded: Seeded) -> None:
    tokens = {}
    for role in ("labeller", "operator"):
        tokens[role] = new_token()
        add_token(seeded.store, f"{role}1", "ci", token_hash(tokens[role]), actor="admin1")
    c = TestClient(seeded.app)
    bearer = {"Authorization": f"Bearer {tokens['labeller']}"}
    assert c.get(f"{API}/me", headers=bearer).json() == {"username": "labeller1", "role": "labeller",
                                                         "csrf": None}  # fmt: skip
    url, body = writes(seeded)["promote"]
    assert c.post(url, json=body, headers=bearer).status_code == 403
    assert c.post(url, json=body, headers={"Authorization": "Bearer " + new_token()}).status_code == 401
    assert rollout_state(seeded) == "active"
    r = c.post(url, json=body, headers={"Authorization": f"Bearer {tokens['operator']}"})
    assert r.status_code == 200, r.text
    assert [e.actor for e in audit(seeded, "rollout.promoted")] == ["operator1"]


# -- 5. bad input -----------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_4xx(seeded: Seeded) -> None:
    c = seeded.client("labeller")
    csrf = seeded.csrf(c)
    dev, now = seeded.seed.drifting[0], time.time()
    unknown_sha = "0" * 64
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/devices/cam-nope", {}, 404, "cam-nope"),
        ("/devices/cam-nope/series", {}, 404, "cam-nope"),
        ("/devices/cam-nope/histograms", {}, 404, "cam-nope"),
        ("/devices/cam-nope/windows", {}, 404, "cam-nope"),
        (f"/models/{unknown_sha}", {}, 404, unknown_sha),
        (f"/models/{unknown_sha}/card", {}, 404, unknown_sha),
        ("/rollouts/987654", {}, 404, "987654"),
        ("/samples/987654", {}, 404, "987654"),
        ("/samples/987654/image", {}, 404, "987654"),
        (f"/devices/{dev}/series", {"since": now, "until": now - 60}, 422, "must be after"),
        (f"/devices/{dev}/series", {"since": now - 500 * DAY, "until": now}, 422, "days"),
        (f"/devices/{dev}/windows", {"since": now - 30 * DAY, "until": now}, 422, "days"),
        ("/alerts", {"since": now, "until": now - 1}, 422, "must be after"),
        ("/audit", {"since": now - 500 * DAY}, 422, "days"),
        ("/devices", {"limit": 0}, 422, "limit"),
        ("/devices", {"limit": 10000}, 422, "limit"),
        ("/samples", {"offset": -1}, 422, "offset"),
        ("/devices", {"sort": "nope"}, 422, "sort"),
        (f"/devices/{dev}/series", {"since": "yesterday"}, 422, "since"),
    ]
    for path, params, status, fragment in cases:
        r = c.get(API + path, params=params)
        clean(r)
        assert r.status_code == status and fragment in str(r.json()["detail"]), (path, params, r.text)
    sample = ids(seeded)["sample_id"]
    posts = [
        (f"/samples/{sample}/label", {"label": "purple"}, 422, "purple"),
        (f"/samples/{sample}/label", {"label": ""}, 422, "label"),
        ("/samples/987654/label", {"label": "red"}, 404, "987654"),
        ("/samples/987654/flag", {"flag": "unusable"}, 404, "987654"),
        (f"/samples/{sample}/flag", {"flag": "lovely"}, 422, "flag"),
    ]
    for path, body, status, fragment in posts:
        r = c.post(API + path, json=body, headers={"X-CSRF-Token": csrf})
        clean(r)
        assert r.status_code == status and fragment in str(r.json()["detail"]), (path, body, r.text)
    assert seeded.store.labels() == [] and not q.flagged_sample_ids(seeded.store)
    op = seeded.client("operator")
    r = op.post(
        f"{API}/rollouts/987654/promote",
        json={"reason": "no such"},
        headers={"X-CSRF-Token": seeded.csrf(op)},
    )
    assert r.status_code == 404 and "987654" in r.json()["detail"]
    r = op.post(writes(seeded)["promote"][0], json={"reason": ""}, headers={"X-CSRF-Token": seeded.csrf(op)})
    assert r.status_code == 422 and rollout_state(seeded) == "active"
    page = c.get("/devices/cam-nope")
    clean(page)
    assert page.status_code == 404 and "cam-nope" in page.text


# -- 6. a promote racing an abort ---------------------------------------------------------------------
def test_concurrent_promote_and_abort_exactly_one_wins(seeded: Seeded) -> None:
    w = writes(seeded)
    clients = {"promote": seeded.client("operator"), "abort": seeded.client("admin")}
    tokens = {k: seeded.csrf(c) for k, c in clients.items()}
    barrier, results = threading.Barrier(2), {}

    def go(action: str) -> None:
        barrier.wait()
        results[action] = post(clients[action], action, *w[action], tokens[action])

    threads = [threading.Thread(target=go, args=(a,)) for a in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(r.status_code for r in results.values())
    assert codes == [200, 409], {k: (r.status_code, r.text) for k, r in results.items()}
    winner = next(a for a, r in results.items() if r.status_code == 200)
    subject = f"rollout/{seeded.seed.rollout_id}"
    promoted, rolled_back = (
        audit(seeded, "rollout.promoted", subject),
        audit(seeded, "rollout.rolled_back", subject),
    )
    assert len(promoted) + len(rolled_back) == 1
    assert rollout_state(seeded) == {"promote": "promoted", "abort": "rolled_back"}[winner]
    assert (promoted or rolled_back)[0].actor == {"promote": "operator1", "abort": "admin1"}[winner]
    assert post(clients["promote"], "promote", *w["promote"], tokens["promote"]).status_code == 409
    assert len(audit(seeded, "rollout.promoted", subject)) == len(promoted)


# -- 7. login --------------------------------------------------------------------------------------------
def test_login_failures_cookie_and_logout(seeded: Seeded) -> None:
    name, password = seeded.seed.users["operator"]
    c = TestClient(seeded.app)
    form = {"username": name, "password": "wrong-password", "next": "/fleet"}
    r = c.post("/login", data=form, follow_redirects=False)
    assert r.status_code == 401 and "wrong user name or password" in r.text and "ef_session" not in c.cookies
    for _ in range(4):
        assert c.post("/login", data=form, follow_redirects=False).status_code == 401
    r = c.post("/login", data={**form, "password": password}, follow_redirects=False)
    assert r.status_code == 429 and "too many failed logins" in r.text and "ef_session" not in c.cookies
    assert len(audit(seeded, "session.refused")) == 5
    viewer = TestClient(seeded.app)  # the address is locked out too, for every user
    r = viewer.post("/login", data=dict(zip(("username", "password"), seeded.seed.users["viewer"])))
    assert r.status_code == 429
    fresh = TestClient(create_app(ConsoleContext(store=seeded.store, repo_path=seeded.seed.repo_path)))
    r = fresh.post("/login", data={**form, "password": password}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/fleet"
    cookie = r.headers["set-cookie"]
    attrs = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")}
    assert cookie.startswith("ef_session=") and "httponly" in attrs
    assert attrs["samesite"].lower() == "samesite=strict" and attrs["path"] == "Path=/"
    session = fresh.cookies["ef_session"]
    assert fresh.get(f"{API}/me").json()["username"] == name
    assert fresh.post("/logout", follow_redirects=False).status_code == 303
    replay = TestClient(fresh.app, cookies={"ef_session": session})
    assert replay.get(f"{API}/me").status_code == 401
    assert replay.get("/fleet", follow_redirects=False).status_code == 303


# -- 8. the database going away -------------------------------------------------------------------------
@pytest.fixture
def own_pg_database(pg_database: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A PostgreSQL database of this test's own (it is closed to connections during the test)."""
    u = make_url(pg_database)
    name = f"ef_away_{uuid.uuid4().hex[:10]}"
    kw = {
        "host": u.host,
        "port": u.port or 5432,
        "user": u.username,
        "dbname": "postgres",
        "autocommit": True,
    }
    with psycopg.connect(**kw) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield u.set(database=name).render_as_string(hide_password=False), kw | {"name": name}
    with psycopg.connect(**kw) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_database_away_is_503_then_recovers(own_pg_database: tuple[str, dict[str, Any]]) -> None:
    url, kw = own_pg_database
    name = kw.pop("name")
    store = Store(url)
    try:
        add_user(store, "viewer1", hash_password("fleet-console-viewer"), "viewer", actor="test")
        app = create_app(ConsoleContext(store=store))
        c = TestClient(app)
        login(c, "viewer1", "fleet-console-viewer")
        assert c.get(f"{API}/devices").json()["total"] == 0
        with psycopg.connect(**kw) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
        try:
            r = c.get(f"{API}/devices")
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert "unreachable" in r.json()["detail"] and "Traceback" not in r.text
            page = c.get("/fleet", follow_redirects=False)
            assert page.status_code == 503 and "Traceback" not in page.text
            assert c.get("/healthz").status_code == 200
        finally:
            with psycopg.connect(**kw) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        assert c.get(f"{API}/devices").status_code == 200
    finally:
        store.close()


def test_the_reference_band_widens_for_a_reference_of_few_frames() -> None:
    from trainer.console.views import _band

    p, band = _band([30, 10, 0, 10], 1000)
    assert p == [0.6, 0.2, 0.0, 0.2] and band is not None
    low, high = band[0]
    assert high - low == pytest.approx(2 * 1.96 * (0.24 * (1 / 1000 + 1 / 50)) ** 0.5)
    assert band[2] == (0.0, 0.0)  # a bin the reference never saw: any frame there is outside
    _, many = _band([3000, 1000, 0, 1000], 1000)  # the same shares from 100x the frames: narrower
    assert many is not None and many[0][1] - many[0][0] < (high - low) / 2
    assert _band(None, 10) == (None, None) and _band([1, 2], 0) == (None, None)


def test_histogram_bands_follow_the_reference_the_device_is_judged_by(seeded: Seeded) -> None:
    """After a promotion a device is judged against its own rebased reference: the bands say so and come
    from it, not from the model's training reference."""
    c, s = seeded.client("viewer"), seeded.seed
    dark = s.drifting[0]
    url = f"{API}/devices/{dark}/histograms"
    before = c.get(url).json()
    assert before["reference"] == "training"
    training = s.champion.manifest.reference
    assert training is not None
    own = training.model_copy(
        update={
            "histograms": {
                k: h.model_copy(update={"counts": [1] * len(h.counts)})
                for k, h in training.histograms.items()
            }
        }
    )
    assert seeded.store.add_device_reference(
        fleet=s.fleet,
        device=dark,
        model_sha256=s.champion.sha256,
        since=1_700_000_000.0,
        windows=3,
        reference=own,
    )
    after = c.get(url).json()
    assert after["reference"] == "device:1700000000"
    bins = len(after["histograms"]["brightness"]["counts"])
    assert after["histograms"]["brightness"]["reference"] == pytest.approx([1 / bins] * bins)
    assert before["histograms"]["brightness"]["reference"] != after["histograms"]["brightness"]["reference"]


def test_a_model_lists_every_device_serving_it(seeded: Seeded) -> None:
    """Devices are counted and listed per model in SQL, not cut from the first page of the fleet."""
    from edge_agent.protocol import ModelRef, Status

    s = seeded.seed
    ref = ModelRef(name="colour", version="2.0.0", sha256=s.candidate.sha256, artifact="onnx-int8")
    extra = [f"gw-{i:03d}" for i in range(60)]
    seeded.store.add_statuses(
        [Status(fleet=s.fleet, device=d, state="online", session=1, ts=time.time(), model=ref) for d in extra]
    )
    c = seeded.client("viewer")
    models = {m["sha256"]: m["devices"] for m in c.get(f"{API}/models").json()["items"]}
    assert models == {s.champion.sha256: 12, s.candidate.sha256: 60}
    page = c.get(f"/models/{s.candidate.sha256}").text
    assert all(f">{d}</a>" in page for d in extra)
    assert not any(f">{d}</a>" in page for d in s.devices)
    progress = {p["device"] for p in c.get(f"{API}/labelling/progress").json()}
    assert progress == set(s.drifting)  # drifted devices only, from their stored health


# -- webhook deliveries: failed and pending ones are visible, with the error and the next attempt ------
def _deliveries(seeded: Seeded, now: float) -> list[int]:
    """Two webhooks on three new alerts: ops has one delivered, one failed, one waiting for a retry;
    pager (gate_failed only) one not tried yet. Returns the alert ids."""
    store = seeded.store
    for hook in ("ops", "pager"):
        webhook_queue.enqueue(store, hook, None, now)  # new webhooks start after the seeded alerts
    new = [
        store.record_alert(kind=k, message=f"{k} for the webhooks", fleet=seeded.seed.fleet)
        for k in ("drift", "gate_failed", "drift")
    ]
    assert webhook_queue.enqueue(store, "ops", None, now).queued == 3
    assert webhook_queue.enqueue(store, "pager", ["gate_failed"], now).queued == 1
    ops = {d.alert_id: d.id for d in webhook_queue.deliveries(store) if d.webhook == "ops"}
    webhook_queue.delivered(store, ops[new[0]], now)
    webhook_queue.attempt_failed(store, ops[new[1]], "HTTP 500", now + 2)
    webhook_queue.attempt_failed(
        store, ops[new[1]], "no complete answer within 5 s (the attempt's deadline)", None
    )
    webhook_queue.attempt_failed(store, ops[new[2]], "ConnectionRefusedError: [Errno 111]", now + 60)
    return [a for a in new if a is not None]


def test_webhook_deliveries_are_listed_filtered_paged_and_shown_on_the_alerts_page(seeded: Seeded) -> None:
    now = time.time()
    first, second, third = _deliveries(seeded, now)
    hook = WebhookSettings(name="ops", url="https://bot:pw@hooks.example/T0/tok3n?k=1", secret="s3cret")
    seeded.ctx.webhooks = {"ops": hook.shown_url}
    c = seeded.client("viewer")
    url = f"{API}/webhooks/deliveries"
    every = c.get(url).json()
    assert every["total"] == 4
    assert [(d["webhook"], d["alert_id"]) for d in every["items"]] == [
        ("pager", second), ("ops", third), ("ops", second), ("ops", first)]  # fmt: skip
    [failed] = c.get(url, params={"state": "failed"}).json()["items"]
    assert (failed["webhook"], failed["alert_id"], failed["kind"], failed["attempts"]) == (
        "ops", second, "gate_failed", 2)  # fmt: skip
    assert "deadline" in failed["last_error"] and failed["next_attempt_at"] is None
    assert failed["url"] == "https://hooks.example/…"
    pending = {d["webhook"]: d for d in c.get(url, params={"state": "pending"}).json()["items"]}
    assert pending["ops"]["next_attempt_at"] == pytest.approx(now + 60)
    assert pending["ops"]["last_error"].startswith("ConnectionRefusedError")
    assert (pending["pager"]["attempts"], pending["pager"]["url"]) == (0, None)  # not in this config
    page = c.get(url, params={"limit": 1, "offset": 1}).json()
    assert (page["total"], [d["alert_id"] for d in page["items"]]) == (4, [third])
    assert c.get(url, params={"webhook": "pager"}).json()["total"] == 1
    assert c.get(url, params={"alert": second}).json()["total"] == 2
    assert c.get(url, params={"fleet": seeded.seed.fleet}).json()["total"] == 4
    assert c.get(url, params={"fleet": "elsewhere"}).json()["total"] == 0
    r = c.get(url, params={"state": "lost"})
    assert r.status_code == 422 and "state" in str(r.json()["detail"])
    assert not any(secret in c.get(url).text for secret in ("pw", "tok3n", "s3cret", "k=1"))
    html = c.get("/alerts").text
    assert "Webhook deliveries not delivered" in html and "the attempt&#39;s deadline" in html
    assert f'data-alert="{second}"' in html and f'data-alert="{third}"' in html
    assert f'data-alert="{first}"' not in html  # delivered: not listed
    assert "hooks.example/…" in html and "tok3n" not in html


def test_a_decision_announces_its_hint_without_taking_over_the_service_connection(
    seeded: Seeded, broker: Any
) -> None:
    """Promote publishes the retained hint on a connection of its own (the service's client id plus a
    suffix: the same id would disconnect the service); a broker that does not answer decides nothing."""
    import paho.mqtt.client as mqtt

    from edge_agent.config import MqttSettings
    from edge_agent.protocol import release_topic

    seeded.ctx.mqtt = MqttSettings(url="mqtt://127.0.0.1:1")  # nothing listens on port 1
    c = seeded.client("operator")
    r = post(c, "promote", *writes(seeded)["promote"], seeded.csrf(c))
    assert r.status_code == 503 and "nothing decided" in r.json()["detail"]
    assert rollout_state(seeded) == "active"

    service_id = f"trainer-{uuid.uuid4().hex[:6]}"
    hints: list[bytes] = []
    dropped = threading.Event()
    svc = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=service_id)
    svc.on_message = lambda _c, _u, m: hints.append(m.payload)
    svc.on_disconnect = lambda *_a: dropped.set()
    host, port = broker.url.removeprefix("mqtt://").split(":")
    svc.connect(host, int(port))
    svc.subscribe(release_topic(seeded.seed.fleet, "stable"), qos=1)
    svc.loop_start()
    try:
        seeded.ctx.mqtt = MqttSettings(url=broker.url, client_id=service_id)
        r = post(c, "promote", *writes(seeded)["promote"], seeded.csrf(c))
        assert r.status_code == 200, r.text
        deadline = time.time() + 10
        while not hints and time.time() < deadline:
            time.sleep(0.05)
        assert hints and json.loads(hints[-1])["release"] == r.json()["release"]
        assert not dropped.is_set(), "the console's hint took the service's connection over"
    finally:
        svc.loop_stop()
        svc.disconnect()
