"""The store on SQLite and PostgreSQL (every test runs on both): dedupe, ordering, model integrity
alerts, status history, dead letters, the labelling queue, and concurrent writers."""

from __future__ import annotations

import threading

import pytest

from edge_agent.package import Artifact, FileEntry, ModelManifest, PreprocessSpec, TensorSpec
from edge_agent.protocol import Status
from edge_agent.telemetry.histogram import default_edges
from trainer.sim.windows import NUM_CLASSES, model_ref, windows
from trainer.store import Rejected, Store
from trainer.store.ingest_writes import write_dead_letters
from trainer.store.schema import DEAD_LETTER_KEEP_BYTES


def manifest(version: str) -> ModelManifest:
    return ModelManifest(
        name="efficientnet-lite0",
        version=version,
        created="2025-01-01T00:00:00Z",
        labels=["cat", "dog"],
        preprocess=PreprocessSpec(),
        artifacts={
            "onnx-fp32": Artifact(
                file="model.onnx",
                runtime="onnxruntime",
                precision="fp32",
                input=TensorSpec(),
                output=TensorSpec(layout="NC"),
            )
        },
        files={"model.onnx": FileEntry(sha256="0" * 64, size=1)},
        telemetry_edges=default_edges(NUM_CLASSES),  # the bins of the simulated windows tests send
    )


@pytest.fixture
def store(db_url: str):
    s = Store(db_url)
    yield s
    s.close()


def test_windows_stored_once_in_any_order(store: Store) -> None:
    ws = windows("cam1", 10)
    first = store.add_windows([ws[5], ws[2], ws[5], ws[9]])  # a duplicate inside one batch, out of order
    assert (first.stored, first.duplicates) == (3, 1)
    dev = store.device("cam1")
    assert dev is not None and dev.last_window_end == ws[9].end
    again = store.add_windows(ws)  # a redelivery of everything, including late windows 0..8
    assert (again.stored, again.duplicates) == (7, 3)
    assert store.window_keys() == [("cam1", 1, i) for i in range(10)]
    dev = store.device("cam1")
    assert dev is not None and dev.last_window_end == ws[9].end  # late windows did not move it back
    assert store.count_windows() == 10
    # time-range queries and the exact merge the drift engine relies on
    sha = ws[0].model.sha256
    got = store.windows(device="cam1", model_sha256=sha, since=ws[3].start, until=ws[7].start)
    assert [w.seq for w in got] == [3, 4, 5, 6]
    assert got[0] == ws[3]  # the payload round-trips exactly
    summary = store.window_summary(model_sha256=sha, device="cam1")
    assert summary.windows == 10
    assert summary.frames.inferred == sum(w.frames.inferred for w in ws)
    expected = [sum(c) for c in zip(*(w.histograms["confidence"].counts for w in ws))]
    assert summary.histograms["confidence"].counts == expected
    assert store.windows(model_sha256="f" * 64) == []


def test_unknown_model_and_model_never_sent_alert_once(store: Store) -> None:
    v1, v2, v3 = model_ref(version="1.0.0"), model_ref(version="2.0.0"), model_ref(version="9.9.9")
    assert store.register_model(manifest("1.0.0"), v1.sha256, actor="alice")
    assert not store.register_model(manifest("1.0.0"), v1.sha256, actor="alice")  # idempotent
    store.register_model(manifest("2.0.0"), v2.sha256, actor="alice")

    r = store.add_windows(windows("cam1", 2, model=v1))  # provisioning model: fine
    assert (r.stored, r.unknown_model, r.alerts) == (2, 0, 0)
    r = store.add_windows(windows("cam1", 2, model=v2, session=2))  # registered, but never sent to cam1
    assert r.alerts == 1
    r = store.add_windows(windows("cam1", 2, model=v3, session=3))  # not registered at all
    assert (r.unknown_model, r.alerts) == (2, 1)
    store.add_windows(windows("cam1", 3, model=v3, session=3, first_seq=2))  # the same again: no new alert
    store.add_statuses([Status(fleet="t", device="cam1", state="online", session=4, ts=1.0, model=v3)])
    kinds = [(a.kind, a.device) for a in store.alerts()]
    assert kinds == [("model_not_sent", "cam1"), ("unknown_model", "cam1")]
    assert "never sent" in store.alerts(kind="model_not_sent")[0].message
    flagged = dict(_rows(store))
    assert flagged == {1: True, 2: True, 3: False}

    # a fleet-wide rollout of v2 covers cam2, which was provisioned with v1
    store.add_windows(windows("cam2", 1, model=v1))
    release = store.record_release(fleet="t", channel="canary", model_sha256=v2.sha256, actor="trainer")
    store.record_rollout(release_id=release, fleet="t", actor="trainer")
    r = store.add_windows(windows("cam2", 1, model=v2, session=2))
    assert r.alerts == 0
    assert store.models_sent_to("cam2") == {v1.sha256, v2.sha256}
    actions = [(e.actor, e.action) for e in store.audit_log()]
    assert ("alice", "model.register") in actions and ("trainer", "release.create") in actions
    assert ("trainer", "rollout.start") in actions and actions.count(("trainer", "alert.raise")) == 2


def _rows(store: Store):
    from sqlalchemy import select

    from trainer.store import Window

    with store.engine.connect() as conn:
        return list(conn.execute(select(Window.session, Window.model_known)))


def test_status_history_and_latest_status(store: Store) -> None:
    ref = model_ref()
    online = Status(
        fleet="t", device="cam1", state="online", session=3, ts=100.0, model=ref, agent_version="0.1.0"
    )
    offline = Status(fleet="t", device="cam1", state="offline", session=3, ts=200.0)
    r = store.add_statuses([offline, online, offline])  # out of order, with a duplicate
    assert (r.stored, r.duplicates) == (2, 1)
    assert store.latest_status()["cam1"] == offline
    dev = store.device("cam1")
    assert dev is not None and dev.state == "offline" and dev.status_ts == 200.0
    assert dev.model_sha256 == ref.sha256  # the last will carries no model: the known one is kept
    assert [s.state for s in store.status_history("cam1")] == ["online", "offline"]


def _status(state: str, session: int, connection: int | None, ts: float, device: str = "cam2") -> Status:
    """A status as an agent sends it (``connection`` None: an agent older than connection numbers)."""
    model = model_ref() if state == "online" else None
    return Status(
        fleet="t",
        device=device,
        state=state,
        session=session,
        connection=connection,
        ts=ts,
        model=model,  # type: ignore[arg-type]
    )


def _current(store: Store, device: str = "cam2") -> tuple[str | None, int | None, int | None]:
    """The device's state by both readers (the status history and the devices row), which must agree."""
    latest = store.latest_status()[device]
    dev = store.device(device)
    assert dev is not None and (dev.state, dev.status_session, dev.status_connection) == (
        latest.state,
        latest.session,
        latest.connection,
    ), (dev.state, dev.status_session, dev.status_connection, latest)
    assert store.status_history(device)[-1] == latest
    return latest.state, latest.session, latest.connection


def test_a_last_will_older_than_its_birth_still_marks_the_device_offline(store: Store) -> None:
    """The will is registered at connect, before the birth is built: its ts is older. Within one
    connection offline follows online; a later session wins whatever the clocks say."""
    online, will = _status("online", 5, 1, 100.0), _status("offline", 5, 1, 99.5)
    store.add_statuses([online])
    store.add_statuses([will])
    assert _current(store) == ("offline", 5, 1)
    back = _status("online", 6, 1, 90.0)  # a clock set back
    store.add_statuses([back])
    assert _current(store) == ("online", 6, 1)
    assert store.device("cam2").session == 6  # type: ignore[union-attr]


@pytest.mark.parametrize("batches", ["one by one", "one batch", "reversed"])
def test_a_reconnect_in_the_same_session_shows_the_device_online_again(store: Store, batches: str) -> None:
    """A network drop or broker restart keeps the session: online -> last will -> online (next
    connection) is online, however the three arrive; a clean stop on that connection is offline, and the
    first connection's will redelivered late changes nothing."""
    seq = [_status("online", 5, 1, 100.0), _status("offline", 5, 1, 99.5), _status("online", 5, 2, 150.0)]
    if batches == "one by one":
        for st in seq:
            store.add_statuses([st])
    else:
        store.add_statuses(seq if batches == "one batch" else seq[::-1])
    assert _current(store) == ("online", 5, 2)
    assert [(h.state, h.connection) for h in store.status_history("cam2")] == [
        ("online", 1),
        ("offline", 1),
        ("online", 2),
    ]
    store.add_statuses([_status("offline", 5, 2, 149.0)])  # the second connection's will (older ts)
    assert _current(store) == ("offline", 5, 2)
    store.add_statuses([_status("online", 5, 3, 151.0)])
    store.add_statuses([_status("offline", 5, 1, 99.6)])  # a late copy of an older will
    assert _current(store) == ("online", 5, 3)


def test_a_window_of_the_new_session_before_its_birth_does_not_hide_the_birth(store: Store) -> None:
    """Windows move ``devices.session`` too (another ingest worker may store them first): the birth that
    follows must still replace the last session's will."""
    store.add_statuses([_status("online", 5, 1, 100.0), _status("offline", 5, 1, 99.5)])
    store.add_windows([w.model_copy(update={"device": "cam2", "session": 6}) for w in windows("cam2", 1)])
    assert store.device("cam2").session == 6  # type: ignore[union-attr]
    store.add_statuses([_status("online", 6, 1, 300.0)])
    assert _current(store) == ("online", 6, 1)


def test_statuses_of_agents_without_connection_numbers_follow_ts(store: Store) -> None:
    """Older agents send no ``connection``: within a session the newer ts wins (their last will, made at
    connect, then loses to its own birth: upgrade the agents to see crashes as offline)."""
    store.add_statuses([_status("online", 4, None, 100.0), _status("offline", 4, None, 99.5)])
    assert _current(store) == ("online", 4, None)
    store.add_statuses([_status("offline", 4, None, 200.0)])  # a clean stop, built when sent
    assert _current(store) == ("offline", 4, None)
    store.add_statuses([_status("online", 5, 1, 10.0)])  # upgraded: a new session, numbered
    assert _current(store) == ("online", 5, 1)


def test_dead_letters_keep_reason_size_and_count(store: Store) -> None:
    big = b"x" * (DEAD_LETTER_KEEP_BYTES * 3)
    with store.write() as conn:
        write_dead_letters(
            conn,
            [
                Rejected("ef/v1/t/dev/a/tele", big, "oversized", "too big", 1.0),
                Rejected("ef/v1/t/dev/a/tele", b"nope", "not_json", "not JSON", 2.0),
                Rejected("ef/v1/t/dev/a/tele", b"nope", "not_json", "not JSON", 3.0),
            ],
        )
    with store.write() as conn:
        write_dead_letters(conn, [Rejected("ef/v1/t/dev/a/tele", b"nope", "not_json", "not JSON", 4.0)])
    by_reason = {d.reason: d for d in store.dead_letters()}
    assert by_reason["oversized"].payload_size == len(big)
    assert len(by_reason["oversized"].payload) == DEAD_LETTER_KEEP_BYTES
    assert by_reason["not_json"].count == 3 and by_reason["not_json"].last_received_at == 4.0
    assert by_reason["not_json"].payload == b"nope"


def test_labelling_queue(store: Store) -> None:
    sid = store.add_sample(
        fleet="t",
        device="cam1",
        ts=1.0,
        consent_policy="blur-faces",
        sha256="a" * 64,
        image=b"\xff\xd8jpeg",
        provenance={"why": "low_confidence"},
    )
    assert sid is not None
    assert (
        store.add_sample(
            fleet="t",
            device="cam1",
            ts=2.0,
            consent_policy="blur-faces",
            sha256="a" * 64,
            image=b"\xff\xd8jpeg",
        )
        is None
    )
    other = store.add_sample(
        fleet="t", device="cam2", ts=3.0, consent_policy="none", sha256="b" * 64, path="/s/b.jpg"
    )
    assert [s.id for s in store.unlabelled_samples()] == [sid, other]
    store.add_label(sid, "cat", source="human", labeller="alice")
    assert [s.id for s in store.unlabelled_samples()] == [other]
    assert [(lb.label, lb.source) for lb in store.labels([sid])] == [("cat", "human")]
    with pytest.raises(ValueError):
        store.add_label(other, "dog", source="guess")
    assert store.count_labelled_samples() == 1 and store.count_labelled_samples(since=2.0) == 0
    assert [s.device for s in store.samples(ids=[other])] == ["cam2"]
    assert [s.id for s in store.samples(since=2.0)] == [other]
    assert ("alice", "label.add") in [(e.actor, e.action) for e in store.audit_log(subject=f"sample/{sid}")]


def test_concurrent_writers_store_each_window_once(db_url: str) -> None:
    """Two writers (separate engines, as two workers) racing on overlapping batches."""
    ws = windows("cam1", 300)
    Store(db_url).close()
    stores = [Store(db_url, create=False) for _ in range(2)]
    results = [0, 0]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            order = ws if i == 0 else ws[::-1]
            for k in range(0, len(order), 20):
                results[i] += stores[i].add_windows(order[k : k + 40]).stored
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for s in stores:
        s.close()
    assert not errors, errors
    assert sum(results) == 300
    with Store(db_url, create=False) as s:
        assert s.window_keys() == [("cam1", 1, i) for i in range(300)]
