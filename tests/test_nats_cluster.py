"""The NATS broker tier (deploy/nats as shipped, rendered by trainer/ops/nats_cluster.py): a three-node
cluster on loopback, devices on its MQTT listeners over mutual TLS, ingest from its JetStream consumer.

* 20 real agents spread over the nodes while the node leading ``$MQTT_msgs`` is SIGKILLed and
  restarted: every window each agent published is stored once, the agents infer throughout, a retained
  release hint is read by devices connecting to the other nodes and to the restarted one;
* a device cannot publish under another device's tree (nothing stored) nor read its commands;
* an ingest worker process SIGKILLed mid-stream loses nothing the devices saw acknowledged.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.config import MqttSettings, validate_config
from edge_agent.protocol import ReleaseHint, release_topic, tele_topic
from trainer.ingest.nats_source import STREAM, NatsSettings, ensure_ingest_consumer
from trainer.ingest.processes import run_worker
from trainer.ingest.worker import IngestConfig, IngestWorker
from trainer.ops import pki as pki_mod
from trainer.ops.nats_cluster import NatsCluster, find_nats_server, render_authorization, render_node
from trainer.release.hints import HintSender
from trainer.sim.tiny import build_tiny_package
from trainer.sim.windows import windows
from trainer.store import Store

from .conftest import require
from .update_helpers import TlsClient, wait_for

FLEET = "natsfleet"
DEVICES = [f"cam-{i:02d}" for i in range(20)]


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PKI of its own: the broker, the trainer and 20 devices (the session's stays as others know it)."""
    d = tmp_path_factory.mktemp("nats-pki")
    pki_mod.init_ca(d)
    pki_mod.issue(d, "broker", kind="server", hosts=("127.0.0.1", "localhost"))
    pki_mod.issue(d, "trainer", kind="service")
    for dev in DEVICES:
        pki_mod.issue(d, dev, kind="device")
    return d


@pytest.fixture
def cluster(tmp_path: Path, fleet_pki: Path) -> Iterator[NatsCluster]:
    require(find_nats_server() is not None, "the nats-server binary (apt-get install nats-server)")
    c = NatsCluster(tmp_path / "nats", fleet_pki, size=3).start()
    yield c
    c.stop()


def trainer_mqtt(cluster: NatsCluster, pki: Path, node: int = 0) -> MqttSettings:
    return MqttSettings(
        url=cluster.mqtt_url(node),
        ca=pki / "ca.crt",
        cert=pki / "service" / "trainer.crt",
        key=pki / "service" / "trainer.key",
    )


def ingest_config(
    cluster: NatsCluster, pki: Path, db_url: str, index: int = 0, ack_wait_s: float = 30
) -> IngestConfig:
    nats = NatsSettings(servers=cluster.nats_urls, ack_wait_s=ack_wait_s)
    return IngestConfig(mqtt=trainer_mqtt(cluster, pki), db_url=db_url, fleet=FLEET, index=index, nats=nats)


def announce(cluster: NatsCluster, pki: Path, node: int, release: int) -> ReleaseHint:
    """The trainer's retained release hint, acknowledged by ``node`` (this also makes the server create
    its MQTT streams, which the ingest consumer needs)."""
    hint = ReleaseHint(
        fleet=FLEET,
        channel="canary",
        model="colour",
        version=f"1.0.{release}",
        release=release,
        target=f"canary/{FLEET}/colour.tar",
        sha256="a" * 64,
        length=1,
        package_sha256="b" * 64,
        ts=time.time(),
    )
    with HintSender(trainer_mqtt(cluster, pki, node)) as sender:
        sender.hint(hint)
    return hint


def read_hint(
    cluster: NatsCluster, pki: Path, node: int, device: str, channel: str = "canary", timeout: float = 10
) -> list[bytes]:
    """What a device connecting to ``node`` reads on a channel's hint topic (retained only); nothing when
    the node refuses the subscription or does not answer it in time (while JetStream elects a leader)."""
    c = TlsClient(cluster.nodes[node].address.mqtt_port, pki, device, client_id=device)
    try:
        c.client.subscribe(release_topic(FLEET, channel), qos=1)
        got = wait_for(lambda: [p for t, p, retained in c.messages if retained] or 0x80 in c.granted, timeout)
        return got if isinstance(got, list) else []
    finally:
        c.close()


def stream_leader(cluster: NatsCluster, pki: Path) -> int:
    """The index of the node leading ``$MQTT_msgs`` (the trainer may read the stream's info)."""
    import asyncio

    from trainer.ingest.nats_source import _connect

    async def leader() -> str:
        settings = NatsSettings(servers=cluster.nats_urls)
        nc = await _connect(settings, trainer_mqtt(cluster, pki), "test-leader")
        try:
            info = await nc.jetstream().stream_info(STREAM)
            return str(info.cluster.leader)
        finally:
            await nc.close()

    name = asyncio.run(leader())
    return next(i for i, n in enumerate(cluster.nodes) if n.address.name == name)


def test_rendered_configs_are_deploy_nats_with_only_the_slots_filled(fleet_pki: Path, tmp_path: Path) -> None:
    """What the tests run is the shipped template: nothing left unfilled, per-device users, and a device
    id nats-server 2.9 could never publish under is refused when rendering, naming it."""
    from trainer.ops.nats_cluster import DEPLOY_DIR, NodeAddress, NodeFiles

    auth = render_authorization(["cam-01", "cam-02"])
    slot = re.compile(r"\{\{[A-Z_]+\}\}")
    assert not slot.search(auth) and auth.count('OU=device"') == 2
    assert '"ef.v1.*.dev.cam-01.tele"' in auth and '"ef.v1.*.dev.cam-02.tele"' in auth
    nodes = [NodeAddress(f"n{i}", host=f"10.0.0.{i}") for i in range(3)]
    files = NodeFiles(*(tmp_path / f for f in ("ca", "crt", "key", "rcrt", "rkey", "store")))
    conf = render_node(nodes[0], nodes, files)
    assert (
        not slot.search(conf) and "nats-route://10.0.0.1:6222" in conf and "nats-route://10.0.0.0" not in conf
    )
    template = (DEPLOY_DIR / "node.conf").read_text()
    assert "stream_replicas: 3" in template and "verify_and_map: true" in template
    with pytest.raises(ValueError, match=r"cam\.01.*'\.'"):
        render_authorization(["cam.01"])
    with pytest.raises(ValueError, match="trainer"):
        render_authorization(["trainer"])


def test_a_device_cannot_publish_under_another_devices_tree_or_read_its_commands(
    cluster: NatsCluster, fleet_pki: Path, tmp_path: Path
) -> None:
    """cam-00 publishes a window on cam-01's topic (nats-server still acknowledges it, as MQTT 3.1.1
    brokers do) then its own: only its own is stored. It subscribes to cam-01's commands and to the
    server's delivery subjects: cam-01 gets its command, cam-00 nothing."""
    announce(cluster, fleet_pki, 0, 1)
    db = f"sqlite:///{tmp_path / 'acl.db'}"
    ensure_ingest_consumer(NatsSettings(servers=cluster.nats_urls), trainer_mqtt(cluster, fleet_pki), FLEET)
    worker = IngestWorker(ingest_config(cluster, fleet_pki, db)).start()
    intruder = TlsClient(cluster.nodes[1].address.mqtt_port, fleet_pki, "cam-00", client_id="cam-00")
    victim = TlsClient(cluster.nodes[2].address.mqtt_port, fleet_pki, "cam-01", client_id="cam-01")
    trainer = TlsClient(
        cluster.nodes[0].address.mqtt_port, fleet_pki, "trainer", "service", client_id="trainer-t"
    )
    try:
        assert worker.wait_connected(30), worker.stats()
        assert victim.subscribe(f"ef/v1/{FLEET}/dev/cam-01/cmd/#") == 1
        snooped = [intruder.subscribe(f"ef/v1/{FLEET}/dev/cam-01/cmd/#"), intruder.subscribe("$MQTT/sub/#")]
        forged, own = windows("cam-01", 1, fleet=FLEET)[0], windows("cam-00", 1, fleet=FLEET)[0]
        intruder.publish(tele_topic(FLEET, "cam-01"), forged.to_bytes())
        intruder.publish(tele_topic(FLEET, "cam-00"), own.to_bytes())
        trainer.publish(f"ef/v1/{FLEET}/dev/cam-01/cmd/sample", b'{"name":"sample","args":{},"id":"x"}')
        assert wait_for(lambda: victim.messages, 10), "the victim never got its command"
        with Store(db, create=False) as store:
            assert wait_for(lambda: store.count_windows() >= 1, 20)
            time.sleep(1)  # the forged window was sent first: had it been taken, it would be stored by now
            assert store.window_keys() == [("cam-00", 1, 0)]
        assert snooped == [0x80, 0x80] and intruder.messages == [], (snooped, intruder.messages)
        s = worker.stats()  # the forged window never reached the stream: nothing to dead-letter either
        assert (s["received"], s["stored"], s["dead_lettered"]) == (1, 1, 0), s
    finally:
        for c in (intruder, victim, trainer):
            c.close()
        worker.stop()


def _agent_config(device: str, url: str, pki: Path, state: Path, package: Path) -> Any:
    return validate_config(
        {
            "device_id": device,
            "fleet": FLEET,
            "state_dir": str(state / device),
            "source": {"uri": "synthetic:?fps=4"},
            "model": {"package": str(package), "artifact": "onnx-fp32"},
            "mqtt": {
                "url": url,
                "ca": str(pki / "ca.crt"),
                "cert": str(pki / "device" / f"{device}.crt"),
                "key": str(pki / "device" / f"{device}.key"),
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 1.0,
            },
            "telemetry": {"window_seconds": 1.0},
            "spool": {"flush_timeout_s": 20.0},
        },
        f"agent {device}",
    )


class Fleet:
    """Real agents (the agent's whole runtime and MQTT link), one thread each, spread over the nodes."""

    def __init__(self, cluster: NatsCluster, pki: Path, workdir: Path) -> None:
        package = build_tiny_package(workdir / "pkg").root
        self.agents = [
            Agent(_agent_config(d, cluster.mqtt_url(i % cluster.size), pki, workdir / "state", package))
            for i, d in enumerate(DEVICES)
        ]
        self.threads = [
            threading.Thread(target=a.run, name=f"agent-{i}", daemon=True) for i, a in enumerate(self.agents)
        ]

    def start(self) -> Fleet:
        for t in self.threads:
            t.start()
        return self

    def spooled(self) -> dict[str, int]:
        """Messages each agent still holds unacknowledged."""
        return {a.config.device_id: len(a.spool) for a in self.agents if len(a.spool)}

    def stop(self) -> None:
        for a in self.agents:
            a.stop()
        for t in self.threads:
            t.join(60)


def _start_workers(configs: list[IngestConfig], stats: Path) -> list[Any]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run_worker, args=(c, str(stats), 0.5), daemon=True) for c in configs]
    for p in procs:
        p.start()
    return procs


def _stop_workers(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive() and p.pid:
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        p.join(30)


def _windows_by_device(store: Store) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for device, session, seq in store.window_keys():
        out.setdefault(device, []).append((session, seq))
    return out


def _rss_mb(cluster: NatsCluster) -> list[float]:
    """Resident memory of each nats-server process (MB)."""
    out = []
    for node in cluster.nodes:
        assert node.proc is not None
        status = Path(f"/proc/{node.proc.pid}/status").read_text()
        out.append(
            round(int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS"))) / 1024, 1)
        )
    return out


def _crash_and_restart(cluster: NatsCluster, pki: Path, down_s: float) -> dict[str, Any]:
    """SIGKILL the node leading $MQTT_msgs; read the hint from a survivor while it is down; restart it;
    read the hint from it. When it happened, and what the two devices read."""
    victim = stream_leader(cluster, pki)
    crash = time.time()
    cluster.kill(victim)
    survivor = (victim + 1) % cluster.size
    during = wait_for(lambda: read_hint(cluster, pki, survivor, "cam-19", timeout=2), down_s - 1) or []
    readable_after = time.time() - crash
    time.sleep(max(0.0, down_s - (time.time() - crash)))
    restart = time.time()
    cluster.restart(victim)
    back = time.time()
    after = read_hint(cluster, pki, victim, "cam-18")
    return {
        "victim": victim,
        "crash": crash,
        "back": back,
        "restart_s": back - restart,
        "hint_readable_after_s": readable_after,
        "hints": (during, after),
    }


@pytest.mark.slow
def test_twenty_agents_lose_nothing_when_the_stream_leader_node_is_killed(
    cluster: NatsCluster, fleet_pki: Path, tmp_path: Path
) -> None:
    """20 agents (a window a second each) on the three nodes and two ingest worker processes on the
    consumer; the node leading $MQTT_msgs is SIGKILLed for 12 s, then restarted on its store. Every window
    each agent published is stored once; every agent's windows from while the node was down count
    inferred frames; the retained hint is read from a survivor and from the restarted node."""
    hint = announce(cluster, fleet_pki, 1, 2)
    info = ensure_ingest_consumer(
        NatsSettings(servers=cluster.nats_urls), trainer_mqtt(cluster, fleet_pki), FLEET
    )
    assert info["replicas"] == 3, info
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    Store(db).close()
    stats = tmp_path / "worker-{index}.json"
    workers = _start_workers([ingest_config(cluster, fleet_pki, db, i) for i in range(2)], stats)
    fleet = Fleet(cluster, fleet_pki, tmp_path).start()
    store = Store(db, create=False)
    try:
        assert wait_for(lambda: len(_windows_by_device(store)) == len(DEVICES), 90), _windows_by_device(store)
        time.sleep(3)
        crash = _crash_and_restart(cluster, fleet_pki, down_s=12)
        time.sleep(3)  # then until every agent delivered what it spooled while its node was down
        assert wait_for(lambda: all(len(a.spool) <= 2 for a in fleet.agents), 120), fleet.spooled()
        caught_up_s = time.time() - crash["back"]
        fleet.stop()
        stopped = time.time()
        published = {a.config.device_id: a.windows_published for a in fleet.agents}
        # A stop can catch a device whose connection the servers just dropped (they drop a client whose
        # message they cannot store yet): its newest windows stay in its spool on disk for its next start
        # (test_mqtt_link's spool tests). Everything else must be stored, once.
        left = fleet.spooled()
        assert all(n <= 2 for n in left.values()), f"windows left in the agents' spools: {left}"
        total = sum(published.values()) - sum(left.values())
        assert wait_for(lambda: store.count_windows() >= total, 90), (published, left, store.count_windows())
        drained_s = time.time() - stopped
        stored = _windows_by_device(store)
        for device, n in published.items():  # once each: the key is (device, session, seq)
            seqs = [q for _, q in stored[device]]
            delivered = n - left.get(device, 0)
            assert seqs[:delivered] == list(range(delivered)) and set(seqs) <= set(range(n)), (
                device,
                n,
                seqs,
            )
            assert len({session for session, _ in stored[device]}) == 1, stored[device]
        for (
            device
        ) in DEVICES:  # inferring throughout: windows that ended while the node was down count frames
            ws = [w for w in store.windows(device=device) if crash["crash"] + 1 <= w.end <= crash["back"]]
            assert ws and all(w.frames.inferred > 0 for w in ws), (device, [(w.seq, w.frames) for w in ws])
        assert crash["hints"] == ([hint.to_bytes()], [hint.to_bytes()]), crash["hints"]
        rss = _rss_mb(cluster)
    finally:
        fleet.stop()
        _stop_workers(workers)
        store.close()
    totals = [json.loads(Path(str(stats).replace("{index}", str(i))).read_text()) for i in range(2)]
    assert sum(t["dead_lettered"] for t in totals) == 0, totals
    assert all(t["stored"] > 0 for t in totals), "both worker processes took a share of the consumer"
    figures = {
        "killed": cluster.nodes[crash["victim"]].address.name,
        "windows": total,
        "left_in_spools_at_stop": left,
        "duplicates": sum(t["duplicates"] for t in totals),
        "redelivered": sum(t["redelivered"] for t in totals),
        "restart_to_healthy_s": round(crash["restart_s"], 1),
        "hint_readable_on_survivor_after_s": round(crash["hint_readable_after_s"], 1),
        "restart_to_spools_drained_s": round(caught_up_s, 1),
        "stop_to_all_stored_s": round(drained_s, 1),
        "nats_rss_mb": rss,
    }
    print("nats cluster:", figures)


def test_an_ingest_worker_killed_mid_stream_loses_nothing_acknowledged(
    cluster: NatsCluster, fleet_pki: Path, tmp_path: Path
) -> None:
    """A worker process is SIGKILLed while windows stream in; a new one (same consumer) takes over after
    the ack wait: every window a device saw acknowledged is stored once."""
    announce(cluster, fleet_pki, 0, 1)
    settings = NatsSettings(servers=cluster.nats_urls, ack_wait_s=3)
    ensure_ingest_consumer(settings, trainer_mqtt(cluster, fleet_pki), FLEET)
    db = f"sqlite:///{tmp_path / 'kill.db'}"
    Store(db).close()
    stats = tmp_path / "w-{index}.json"
    first = _start_workers([ingest_config(cluster, fleet_pki, db, 0, ack_wait_s=3)], stats)
    device = TlsClient(cluster.nodes[2].address.mqtt_port, fleet_pki, "cam-05", client_id="cam-05")
    ws = windows("cam-05", 300, fleet=FLEET)
    store = Store(db, create=False)
    try:
        for w in ws[:150]:
            device.publish(tele_topic(FLEET, "cam-05"), w.to_bytes())
        assert wait_for(lambda: store.count_windows() > 0, 30)
        for w in ws[150:]:
            device.client.publish(tele_topic(FLEET, "cam-05"), w.to_bytes(), qos=1)
        first[0].kill()  # SIGKILL, mid-stream
        first[0].join(10)
        for w in ws[-1:]:
            device.publish(tele_topic(FLEET, "cam-05"), w.to_bytes())  # in order: all before are acked too
        killed_at = store.count_windows()
        mqtt = trainer_mqtt(cluster, fleet_pki)
        nats_urls = [a for url in cluster.nats_urls for a in ("--nats", url)]
        second = subprocess.Popen(  # the replacement is the real command line a deployment runs
            [sys.executable, "-m", "edge_agent.cli", "ingest", "run", "--broker", mqtt.url, "--db", db]
            + ["--fleet", FLEET, "--index", "1", "--stats-file", str(stats), "--stats-interval", "0.5"]
            + ["--ca", str(mqtt.ca), "--cert", str(mqtt.cert), "--key", str(mqtt.key), *nats_urls],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert wait_for(lambda: store.count_windows() == len(ws), 60), (killed_at, store.count_windows())
            assert store.window_keys() == [("cam-05", 1, i) for i in range(len(ws))]
        finally:
            second.send_signal(signal.SIGTERM)
            _, err = second.communicate(timeout=30)
        assert second.returncode == 0, err[-2000:]
        assert killed_at < len(ws), "the worker was killed after it had stored everything: nothing tested"
    finally:
        device.close()
        store.close()
        _stop_workers(first)
    after = json.loads((tmp_path / "w-1.json").read_text())
    print(
        "worker kill:",
        {"stored_before_kill": killed_at, "windows": len(ws), "redelivered": after["redelivered"]},
    )


def test_the_trainer_service_on_the_nats_tier_creates_its_consumer_ingests_and_hints(
    cluster: NatsCluster, fleet_pki: Path, tmp_path: Path
) -> None:
    """trainer.yaml's ``nats:`` section: the service creates the ingest consumer at startup (before any
    device published), ingests from it, and its retained hint reaches a device on another node."""
    from trainer.fleet.config import ReleaseServerSettings, TrainerServiceConfig, TrainingSettings
    from trainer.fleet.service import Timeline, TrainerService

    cfg = TrainerServiceConfig(
        fleet=FLEET,
        mqtt=trainer_mqtt(cluster, fleet_pki, 0).model_copy(update={"client_id": "trainer"}),
        nats=NatsSettings(servers=cluster.nats_urls),
        ingest_workers=2,
        db_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        release=ReleaseServerSettings(repo=tmp_path / "repo", port=0),
        training=TrainingSettings(base_data="builtin:shapes", model="colour", work_dir=tmp_path / "work"),
        tick_s=0.5,
    )
    service = TrainerService(cfg, timeline=Timeline(echo=False)).start()
    device = TlsClient(cluster.nodes[2].address.mqtt_port, fleet_pki, "cam-07", client_id="cam-07")
    try:
        assert any("NATS ingest consumer ingest" in e.message for e in service.timeline.events)
        assert all(w.wait_connected(30) for w in service.workers)
        ws = windows("cam-07", 40, fleet=FLEET, start=time.time() - 400)  # recent: retention keeps them
        for w in ws:
            device.publish(tele_topic(FLEET, "cam-07"), w.to_bytes())
        assert wait_for(lambda: service.store.count_windows() == len(ws), 30), service.store.count_windows()
        assert sum(w.stats()["stored"] for w in service.workers) == len(ws)
        service.release_initial(build_tiny_package(tmp_path / "champion", name="colour"))
        hint = wait_for(lambda: read_hint(cluster, fleet_pki, 1, "cam-08", "stable"), 20)
        assert hint and ReleaseHint.model_validate_json(hint[0]).version == "1.0.0", hint
    finally:
        device.close()
        service.stop()


def test_an_agent_with_fallback_urls_moves_to_a_surviving_node(
    cluster: NatsCluster, fleet_pki: Path, tmp_path: Path
) -> None:
    """``mqtt.fallback_urls`` lists the other nodes: when the agent's node dies for good, its link connects
    to a survivor and its windows keep being stored while the node stays down."""
    announce(cluster, fleet_pki, 0, 1)  # the first MQTT client makes the server create $MQTT_msgs
    ensure_ingest_consumer(NatsSettings(servers=cluster.nats_urls), trainer_mqtt(cluster, fleet_pki), FLEET)
    db = f"sqlite:///{tmp_path / 'failover.db'}"
    Store(db).close()
    workers = _start_workers([ingest_config(cluster, fleet_pki, db, 0)], tmp_path / "w-{index}.json")
    cfg = _agent_config(
        "cam-03",
        cluster.mqtt_url(0),
        fleet_pki,
        tmp_path / "state",
        build_tiny_package(tmp_path / "pkg").root,
    )
    cfg = cfg.model_copy(
        update={
            "mqtt": cfg.mqtt.model_copy(update={"fallback_urls": [cluster.mqtt_url(1), cluster.mqtt_url(2)]})
        }
    )
    agent = Agent(cfg)
    thread = threading.Thread(target=agent.run, name="agent-failover", daemon=True)
    store = Store(db, create=False)
    thread.start()
    try:
        assert wait_for(lambda: store.count_windows() >= 3, 60), store.count_windows()
        cluster.kill(0)  # and it stays down
        at_kill = store.count_windows()
        assert wait_for(lambda: store.count_windows() >= at_kill + 10, 90), (at_kill, store.count_windows())
        assert agent.link.stats()["events"]["mqtt_connects"] >= 2
    finally:
        agent.stop()
        thread.join(60)
        store.close()
        _stop_workers(workers)
