"""The trainer service's Prometheus metrics against what its store holds, after a short run of real agents
(trainer/sim/fleet.py's simulated cameras running :class:`edge_agent.agent.Agent`) and the real service
(tests/test_fleet_loop.py's config) on the session broker; duplicates and dead letters in the counters;
rollout states; a scrape while the database is away; the console's ``/metrics`` (API tokens, content
type) and ``trainer serve`` serving them there instead of on a port of their own; the Grafana dashboard's
queries against a real scrape."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from edge_agent.config import MqttSettings
from edge_agent.package import ModelPackage
from edge_agent.protocol import Status, status_topic, tele_topic
from trainer.console.app import create_app
from trainer.console.auth import hash_password, new_token, token_hash
from trainer.console.deps import ConsoleContext
from trainer.drift.detector import DriftConfig
from trainer.fleet.config import ConsoleSettings, MetricsSettings, ReleaseServerSettings, TrainingSettings
from trainer.fleet.rollout import decide_by_hand
from trainer.fleet.service import Timeline, TrainerService
from trainer.fleet.webhooks import WebhookSettings
from trainer.ops.broker import MosquittoBroker, free_port
from trainer.sim.fleet import FleetSimulator, ShiftSchedule, device_config
from trainer.sim.tiny import build_tiny_package
from trainer.sim.windows import windows
from trainer.store.console_queries import device_health
from trainer.store.console_users import add_token, add_user
from trainer.store.schema import WebhookDelivery

from .console_fixtures import *  # noqa: F403 - the live_console fixture
from .console_fixtures import Seeded
from .mqtt_helpers import wait_until
from .test_console_api import own_pg_database  # noqa: F401 - a fixture
from .test_fleet_loop import _service_config
from .test_webhooks import Receiver

FLEET = "scrape"
FLEET_AWAY = "scrape-away"
ROOT = Path(__file__).resolve().parents[1]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def series(samples: Samples, name: str, key: str) -> dict[str, float]:
    """The samples of ``name`` by the value of their label ``key``."""
    return {dict(labels)[key]: v for (n, labels), v in samples.items() if n == name}


def scrape(url: str, token: str | None = None) -> str:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode())


@dataclass
class FleetRun:
    """A running service with metrics, two cameras on the champion still running, one on a model the
    trainer never registered (stopped), and what was scraped when they were all up."""

    service: TrainerService
    cameras: FleetSimulator
    champion: ModelPackage
    workdir: Path
    url: str
    receiver: Receiver
    first_scrape: str
    agent_scrape: str
    broker: MosquittoBroker


def _agents(run_dir: Path, broker: MosquittoBroker, packages: dict[str, ModelPackage]) -> FleetSimulator:
    """Real agents on simulated cameras: 2 s windows, a textfile of their own metrics each."""
    configs = [
        device_config(
            device,
            FLEET,
            run_dir / "devices",
            pkg.root,
            broker.url,
            window_seconds=2.0,
            sampling_consent=None,
            extra={"metrics": {"textfile": str(run_dir / f"{device}.prom")}},
        )
        for device, pkg in packages.items()
    ]
    return FleetSimulator(configs, ShiftSchedule(), fps=10.0).start()


def _health_and_alert_in(service: TrainerService) -> bool:
    """Both champion cameras have an estimate in the store, and the stranger's alert was delivered."""
    store = service.store
    for device in ("mx-a", "mx-b"):
        h = device_health(store, device)
        if h is None or h.estimated_accuracy is None:
            return False
    with store.engine.connect() as conn:
        delivered = conn.scalar(select(func.count()).where(WebhookDelivery.state == "delivered"))
    return bool(store.alerts(kind="unknown_model")) and bool(delivered)


@pytest.fixture(scope="module")
def fleet_run(broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetRun]:
    tmp = tmp_path_factory.mktemp("metrics")
    champion = build_tiny_package(tmp / "v1", version="1.0.0", name="tiny")
    stranger = build_tiny_package(tmp / "v0", version="0.9.0", name="tiny")  # never registered
    receiver = Receiver([])
    cfg = _service_config(tmp, broker.url, base_data="builtin:shapes")
    cfg.fleet, cfg.slot_s, cfg.grace_s = FLEET, 2.0, 1.0
    cfg.drift = DriftConfig(min_window_frames=10)
    cfg.metrics = MetricsSettings(port=free_port())
    cfg.webhooks = [WebhookSettings(name="ops", url=receiver.url, kinds=["unknown_model"])]
    service = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    cameras = stranger_cam = None
    try:
        service.release_initial(champion)
        cameras = _agents(tmp, broker, {"mx-a": champion, "mx-b": champion})
        stranger_cam = _agents(tmp, broker, {"mx-x": stranger})
        assert wait_until(lambda: _health_and_alert_in(service), 120), service.store.devices(FLEET)
        stranger_cam.stop()
        assert wait_until(lambda: getattr(service.store.device("mx-x"), "state", None) == "offline", 20)
        url = f"http://127.0.0.1:{cfg.metrics.port}/metrics"
        yield FleetRun(
            service,
            cameras,
            champion,
            tmp,
            url,
            receiver,
            scrape(url),
            (tmp / "mx-a.prom").read_text(),
            broker,
        )
    finally:
        for sim in (cameras, stranger_cam):
            if sim is not None:
                sim.stop()
        service.stop()
        receiver.close()
        _forget_retained(broker, FLEET, ["mx-a", "mx-b", "mx-x"])


def _forget_retained(broker: MosquittoBroker, fleet: str, devices: list[str]) -> None:
    """Leave no retained status of a test's devices on the session broker."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    for d in devices:
        pub.publish(status_topic(fleet, d), b"", qos=1, retain=True).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()


def test_the_grafana_dashboard_queries_only_series_a_real_scrape_serves(fleet_run: FleetRun) -> None:
    """deploy/grafana/edgefleet.json: every edgefleet_* series it queries (panels and the fleet variable)
    has samples in a scrape of the running service or of a running agent (its textfile)."""
    served = {name for name, _ in parse(fleet_run.first_scrape)} | {
        name for name, _ in parse(fleet_run.agent_scrape)
    }
    dash = json.loads((ROOT / "deploy" / "grafana" / "edgefleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    used = {n for e in exprs for n in re.findall(r"edgefleet_[a-z_]+", e)}
    assert used and used <= served, sorted(used - served)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def _store_view(service: TrainerService) -> dict[str, Any]:
    """What the store holds for the fleet, read with the store's own facades (not the collector's query)."""
    store = service.store
    out: dict[str, Any] = {"devices": {}, "health": {}}
    for d in store.devices(FLEET):
        out["devices"][d.device] = d
        out["health"][d.device] = device_health(store, d.device)
    now = time.time()
    out["activity"] = [store.recent_activity(FLEET, now - 120 - dt) for dt in (-0.5, 0.0, 0.5)]
    with store.engine.connect() as conn:
        q = select(WebhookDelivery.webhook, WebhookDelivery.state, func.count()).group_by(
            WebhookDelivery.webhook, WebhookDelivery.state
        )
        out["webhooks"] = {(w, s): float(n) for w, s, n in conn.execute(q)}
    return out


_MOVING = ("edgefleet_device_last_window_age_seconds", "edgefleet_ingest_", "edgefleet_service_errors")


def _settled_scrape(run: FleetRun) -> tuple[Samples, dict[str, Any], float, float]:
    """A scrape, the store read right after, and a second scrape that agrees with the first on every
    store-derived series (the cameras keep sending; a window landing in between means try again)."""
    for _ in range(30):
        t0 = time.time()
        first = parse(scrape(run.url))
        t1 = time.time()
        held = _store_view(run.service)
        again = parse(scrape(run.url))
        steady = {k: v for k, v in first.items() if not k[0].startswith(_MOVING)}
        if steady == {k: v for k, v in again.items() if not k[0].startswith(_MOVING)}:
            return first, held, t0, t1
        time.sleep(0.1)
    pytest.fail("the store kept changing between two scrapes")


def _check_devices(got: Samples, held: dict[str, Any], t0: float, t1: float) -> None:
    """Each device series equals what the devices and device_health rows say."""
    devices, health = held["devices"], held["health"]
    assert set(devices) == {"mx-a", "mx-b", "mx-x"}
    online = series(got, "edgefleet_device_online", "device")
    assert online == {d: float(r.state == "online") for d, r in devices.items()}
    assert online == {"mx-a": 1.0, "mx-b": 1.0, "mx-x": 0.0}  # the stranger's camera was stopped
    for d, age in series(got, "edgefleet_device_last_window_age_seconds", "device").items():
        end = devices[d].last_window_end
        assert t0 - end - 0.01 <= age <= t1 - end + 0.01, (d, age)
    fps = series(got, "edgefleet_device_frames_per_second", "device")
    assert set(fps) == set(devices)
    for d, value in fps.items():  # the scrape's 120 s span starts within the store reads' spans
        assert any(a[d].frames_per_second == pytest.approx(value) for a in held["activity"]), d
    accuracy = series(got, "edgefleet_device_estimated_accuracy_ratio", "device")
    assert accuracy == {
        d: h.estimated_accuracy for d, h in health.items() if h and h.estimated_accuracy is not None
    }
    assert set(accuracy) == {"mx-a", "mx-b"}  # no estimate on a model the trainer does not know
    drift = series(got, "edgefleet_device_drift", "device")
    assert drift == {d: float(h.drift_state == "drift") for d, h in health.items() if h and h.drift_state}
    info = {dict(k[1])["device"]: dict(k[1]) for k in got if k[0] == "edgefleet_device_info"}
    for d, row in devices.items():
        labels = (row.model_name, row.model_version, row.agent_version)
        assert (info[d]["model"], info[d]["version"], info[d]["agent_version"]) == labels


def _check_models(got: Samples, held: dict[str, Any], champion: ModelPackage) -> None:
    """Devices and the mean estimate per model version, computed here from the device rows."""
    per_version: dict[str, list[str]] = {}
    for d, row in held["devices"].items():
        per_version.setdefault(row.model_version, []).append(d)
    assert series(got, "edgefleet_model_devices", "version") == {v: len(ds) for v, ds in per_version.items()}
    assert per_version.keys() == {"1.0.0", "0.9.0"}
    mean = {}
    for v, ds in per_version.items():
        est = [
            held["health"][d].estimated_accuracy
            for d in ds
            if held["health"][d] is not None
            and held["health"][d].model_sha256 == held["devices"][d].model_sha256
            and held["health"][d].estimated_accuracy is not None
        ]
        if est:
            mean[v] = sum(est) / len(est)
    got_mean = series(got, "edgefleet_model_estimated_accuracy_ratio", "version")
    assert got_mean.keys() == mean.keys() == {champion.manifest.version}
    assert got_mean[champion.manifest.version] == pytest.approx(mean[champion.manifest.version])


def test_metrics_scrape_shows_what_the_store_holds(fleet_run: FleetRun) -> None:
    run, store = fleet_run, fleet_run.service.store
    got, held, t0, t1 = _settled_scrape(run)
    _check_devices(got, held, t0, t1)
    _check_models(got, held, run.champion)
    stable = run.service.repo.current("stable", FLEET, "tiny")
    assert stable is not None
    rec = store.model(stable.package_sha256)
    assert rec is not None
    key = ("edgefleet_champion_info", (("fleet", FLEET), ("model", rec.name), ("version", rec.version)))
    assert got[key] == 1.0
    assert not [r for r in store.rollouts(FLEET) if (r.cohort or "").startswith("canary")]
    assert series(got, "edgefleet_rollout_state", "state") == {
        "none": 1.0,
        "canary": 0.0,
        "promoted": 0.0,
        "rolled_back": 0.0,
    }
    hooks = {
        (dict(k[1])["webhook"], dict(k[1])["state"]): v
        for k, v in got.items()
        if k[0] == "edgefleet_webhook_deliveries"
    }
    assert hooks == held["webhooks"] and hooks[("ops", "delivered")] >= 1
    assert run.receiver.calls  # the unknown_model alert of the stranger's camera reached the receiver
    assert series(got, "edgefleet_store_up", "fleet") == {FLEET: 1.0}

    # the cameras stop: the counters settle and add up to what the store holds
    run.cameras.stop()
    settled = _settled_counters(run)
    windows_held = store.count_windows(fleet=FLEET)
    statuses_held = sum(len(store.status_history(d)) for d in ("mx-a", "mx-b", "mx-x"))
    assert settled["stored"] == windows_held + statuses_held
    assert settled["received"] == settled["stored"] + settled["duplicate"] + settled["dead_lettered"]
    _check_duplicate_and_junk(run, settled, windows_held)


def _counters(url: str) -> dict[str, float]:
    return series(parse(scrape(url)), "edgefleet_ingest_messages_total", "outcome")


def _settled_counters(run: FleetRun) -> dict[str, float]:
    """The ingest counters once every camera is offline and nothing has arrived for a second."""
    store = run.service.store
    assert wait_until(lambda: all(d.state == "offline" for d in store.devices(FLEET)), 30)
    last: dict[str, float] = {}
    for _ in range(60):
        now = _counters(run.url)
        if (
            now == last
            and series(parse(scrape(run.url)), "edgefleet_ingest_buffered_messages", "fleet")[FLEET] == 0
        ):
            return now
        last = now
        time.sleep(1.0)
    pytest.fail(f"ingest counters did not settle: {last}")


def _check_duplicate_and_junk(run: FleetRun, before: dict[str, float], windows_held: int) -> None:
    """A stored window published again counts one duplicate; junk on a telemetry topic one dead letter."""
    store = run.service.store
    again = store.windows(device="mx-a")[-1]
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", run.broker.port)
    pub.loop_start()
    try:
        pub.publish(tele_topic(FLEET, "mx-a"), again.to_bytes(), qos=1).wait_for_publish(5)
        assert wait_until(lambda: _counters(run.url)["duplicate"] == before["duplicate"] + 1, 20)
        pub.publish(tele_topic(FLEET, "mx-a"), b"{not json", qos=1).wait_for_publish(5)
        assert wait_until(lambda: _counters(run.url)["dead_lettered"] == before["dead_lettered"] + 1, 20)
    finally:
        pub.loop_stop()
        pub.disconnect()
    after = _counters(run.url)
    assert after == {
        "received": before["received"] + 2,
        "stored": before["stored"],
        "duplicate": before["duplicate"] + 1,
        "dead_lettered": before["dead_lettered"] + 1,
    }
    assert store.count_windows(fleet=FLEET) == windows_held
    assert [d.reason for d in store.dead_letters() if d.topic == tele_topic(FLEET, "mx-a")] == ["not_json"]


def test_rollout_state_follows_a_canary_and_its_abort(fleet_run: FleetRun) -> None:
    """The labelled rollout state reads the store: a canary started by the service, aborted by hand."""
    run = fleet_run
    candidate = build_tiny_package(run.workdir / "v2", version="2.0.0", name="tiny")
    assert run.service.rollout is not None
    run.service.rollout.start_canary(candidate, run.champion.sha256)
    got = parse(scrape(run.url))
    assert series(got, "edgefleet_rollout_state", "state") == {
        "none": 0.0,
        "canary": 1.0,
        "promoted": 0.0,
        "rolled_back": 0.0,
    }
    assert series(got, "edgefleet_rollout_active", "fleet") == {FLEET: 1.0}
    assert series(got, "edgefleet_rollout_canary_info", "version") == {"2.0.0": 1.0}
    decide_by_hand(
        run.service.store,
        run.service.repo,
        None,
        fleet=FLEET,
        model="tiny",
        action="abort",
        reason="test",
        actor="test",
    )
    got = parse(scrape(run.url))
    assert series(got, "edgefleet_rollout_state", "state")["rolled_back"] == 1.0
    assert sum(series(got, "edgefleet_rollout_state", "state").values()) == 1.0
    assert series(got, "edgefleet_rollout_active", "fleet") == {FLEET: 0.0}
    assert [r.state for r in run.service.store.rollouts(FLEET) if (r.cohort or "").startswith("canary")] == [
        "rolled_back"
    ]


# -- the database going away ------------------------------------------------------------------------------
def _close_database(kw: dict[str, Any], name: str, allow: bool) -> None:
    import psycopg

    with psycopg.connect(**kw) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allow else "false"}')
        if not allow:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )


def test_a_scrape_while_the_database_is_away_serves_the_rest(
    own_pg_database: tuple[str, dict[str, Any]],  # noqa: F811 - the fixture imported above
    broker: MosquittoBroker,
    tmp_path: Path,
) -> None:
    """Store-derived series go, the service's own counters stay, edgefleet_store_up says 0, the service
    loop goes on (its failing steps counted), and on the console a token that scraped before still may."""
    db_url, kw = own_pg_database
    name = kw.pop("name")
    cfg = _service_config(tmp_path, broker.url, base_data="builtin:shapes")
    cfg.fleet, cfg.db_url, cfg.slot_s, cfg.grace_s = FLEET_AWAY, db_url, 2.0, 0.5  # drift reads every 2 s
    cfg.metrics = MetricsSettings(port=free_port())
    service = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    url = f"http://127.0.0.1:{cfg.metrics.port}/metrics"
    try:
        assert all(w.wait_connected(10) for w in service.workers)
        _publish_windows(broker, FLEET_AWAY, "cam-away")
        assert wait_until(lambda: service.store.count_windows(fleet=FLEET_AWAY) == 3, 20)
        add_user(service.store, "prom", hash_password("prometheus-scraper"), "viewer", actor="test")
        token, stranger = new_token(), new_token()
        add_token(service.store, "prom", "prometheus", token_hash(token), actor="test")
        add_token(service.store, "prom", "never scraped", token_hash(stranger), actor="test")
        console = TestClient(
            create_app(ConsoleContext(store=service.store, metrics=service.metrics_registry))
        )
        assert console.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        before = parse(scrape(url))
        assert series(before, "edgefleet_device_online", "device") == {"cam-away": 1.0}
        errors_before = series(before, "edgefleet_service_errors_total", "fleet")[FLEET_AWAY]
        _close_database(kw, name, allow=False)
        try:
            assert wait_until(lambda: service.errors > errors_before, 20)  # the loop runs, its steps fail
            during = parse(scrape(url))
            assert series(during, "edgefleet_store_up", "fleet") == {FLEET_AWAY: 0.0}
            assert not series(during, "edgefleet_device_online", "device")
            assert not series(during, "edgefleet_rollout_state", "state")
            counted = series(during, "edgefleet_ingest_messages_total", "outcome")
            assert counted == series(before, "edgefleet_ingest_messages_total", "outcome")
            assert series(during, "edgefleet_service_errors_total", "fleet")[FLEET_AWAY] > errors_before
            r = console.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and "edgefleet_store_up" in r.text
            assert console.get("/metrics", headers={"Authorization": f"Bearer {stranger}"}).status_code == 401
            assert service._thread is not None and service._thread.is_alive()
        finally:
            _close_database(kw, name, allow=True)
        back = parse(scrape(url))
        assert series(back, "edgefleet_store_up", "fleet") == {FLEET_AWAY: 1.0}
        assert series(back, "edgefleet_device_online", "device") == {"cam-away": 1.0}
    finally:
        service.stop()
        _forget_retained(broker, FLEET_AWAY, ["cam-away"])


def _publish_windows(broker: MosquittoBroker, fleet: str, device: str) -> None:
    """An online status (retained) and three windows of one device."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    now = time.time()
    status = Status(fleet=fleet, device=device, state="online", session=1, ts=now)
    pub.publish(status_topic(fleet, device), status.to_bytes(), qos=1, retain=True).wait_for_publish(5)
    for w in windows(device, 3, fleet=fleet, start=now - 30):
        pub.publish(tele_topic(fleet, device), w.to_bytes(), qos=1).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()


# -- the console's /metrics --------------------------------------------------------------------------------
def _get(url: str, **headers: str) -> tuple[int, dict[str, str], str]:
    """Status, headers (lower-case names) and body of a GET, error statuses included."""
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()


def _unstarted_service(s: Seeded, tmp_path: Path) -> TrainerService:
    """The real service object of the seeded fleet, not started: its collector reads the seeded store."""
    from trainer.fleet.config import TrainerServiceConfig

    cfg = TrainerServiceConfig(
        fleet=s.seed.fleet,
        mqtt=MqttSettings(url="mqtt://127.0.0.1:1"),
        db_url=s.store.url,
        release=ReleaseServerSettings(repo=s.seed.repo_path, port=0),
        training=TrainingSettings(
            base_data="builtin:shapes", model=s.seed.champion.manifest.name, work_dir=tmp_path / "work"
        ),
        metrics=MetricsSettings(),
    )
    return TrainerService(cfg, timeline=Timeline(echo=False))


def test_the_console_serves_the_metrics_to_api_tokens(
    live_console: tuple[str, Seeded], tmp_path: Path
) -> None:
    """/metrics on a live console: 401 without a valid API token, the Prometheus text format (or
    OpenMetrics when asked) with the seeded store's values for one, open with ``console_auth: none``,
    404 on a console that runs without the service."""
    url, s = live_console
    service = _unstarted_service(s, tmp_path)
    try:
        s.ctx.metrics = service.metrics_registry
        status, headers, body = _get(f"{url}/metrics")
        assert status == 401 and headers["www-authenticate"] == "Bearer" and "API token" in body
        assert _get(f"{url}/metrics", Authorization="Bearer not-a-token")[0] == 401
        token = new_token()
        add_token(s.store, s.seed.users["viewer"][0], "prometheus", token_hash(token), actor="test")
        status, headers, body = _get(f"{url}/metrics", Authorization=f"Bearer {token}")
        assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        got = parse(body)
        devices = s.store.devices(s.seed.fleet)
        assert series(got, "edgefleet_device_online", "device") == {
            d.device: float(d.state == "online") for d in devices if d.state
        }
        assert sum(series(got, "edgefleet_model_devices", "version").values()) == len(devices)
        canary = [r for r in s.store.rollouts(s.seed.fleet) if (r.cohort or "").startswith("canary")][-1]
        assert canary.state == "active"  # the seed's running canary
        assert series(got, "edgefleet_rollout_state", "state")["canary"] == 1.0
        om = "application/openmetrics-text; version=1.0.0"
        status, headers, body = _get(f"{url}/metrics", Authorization=f"Bearer {token}", Accept=om)
        assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith("# EOF\n")
        s.ctx.metrics_auth = "none"
        assert _get(f"{url}/metrics")[0] == 200
        s.ctx.metrics = None
        assert _get(f"{url}/metrics", Authorization=f"Bearer {token}")[0] == 404
    finally:
        service.store.close()


def test_a_metrics_port_of_their_own_only_without_a_console_or_when_set() -> None:
    assert MetricsSettings().own_port(console=False) == 9464
    assert MetricsSettings().own_port(console=True) is None
    assert MetricsSettings(port=9470).own_port(console=True) == 9470


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (Linux: its socket inodes among /proc/net/tcp{,6}'s LISTEN rows)."""
    import os

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def _edgefleet(*args: str, stdin: str = "") -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_trainer_serve_serves_metrics_in_its_console_and_opens_no_port_for_them(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """`edgefleet trainer serve` with a console: and a metrics: section, as a user runs it: Prometheus
    scrapes the console's /metrics with an API token made by `edgefleet console token add`, and the
    service listens on the console's and the release server's ports only (no 9464)."""
    cfg = _service_config(tmp_path, broker.url, base_data="builtin:shapes")
    cfg.fleet = "scrape-serve"
    cfg.mqtt = MqttSettings(url=broker.url, client_id="trainer-serve-test")
    cfg.console = ConsoleSettings(port=free_port())
    cfg.metrics = MetricsSettings()
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    _edgefleet(
        "console",
        "user",
        "add",
        "prom",
        "--role",
        "viewer",
        "--password-stdin",
        "--config",
        str(path),
        stdin="prometheus-scraper\n",
    )
    token = _edgefleet(
        "console", "token", "add", "prom", "--name", "prometheus", "--config", str(path)
    ).split()[-1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "trainer", "serve", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]  # the timeline's lines, then the console's address
        while not lines[-1].startswith("console at") and lines[-1] and len(lines) < 20:
            lines.append(proc.stdout.readline())
        line = lines[-1]
        assert line.startswith("console at"), "".join(lines) + (
            proc.stderr.read() if proc.poll() is not None else ""
        )
        console = line.split()[2]
        status, _, body = _get(f"{console}/metrics", Authorization=f"Bearer {token}")
        assert status == 200
        assert parse(body)[("edgefleet_store_up", (("fleet", "scrape-serve"),))] == 1.0
        ports = _listening_ports(proc.pid)
        assert cfg.console.port in ports and 9464 not in ports and len(ports) == 2, ports  # + releases
    finally:
        proc.terminate()
        proc.wait(30)
