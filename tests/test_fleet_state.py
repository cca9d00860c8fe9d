"""The store's view of a fleet for monitoring (trainer/store/fleet_state.py) and removing a device, on
SQLite and PostgreSQL (every test runs on both)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from edge_agent.protocol import Status
from trainer.errors import UnknownDeviceError
from trainer.sim.windows import model_ref, windows
from trainer.store import Store
from trainer.store.console_queries import HealthRow, device_health, put_device_health
from trainer.store.fleet_state import forget_device, model_serving, removed_devices


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()


def _health(sha: str, accuracy: float) -> HealthRow:
    return HealthRow(sha, "ok", "training", accuracy, None, None, "atc", 0, 1.0, 0.8)


def test_recent_activity_adds_up_frames_and_confidence(store: Store) -> None:
    """Frames per second over the windows' span and their frame-weighted mean confidence (on PostgreSQL
    the sums are NUMERIC: a division by one failed, and with it every device series of a scrape)."""
    ws = windows("cam-1", 3, fleet="f", start=1000.0, frames_per_window=30, window_s=10.0)
    store.add_windows(ws)
    [(device, act)] = store.recent_activity("f", since=1000.0).items()
    assert device == "cam-1"
    assert act.frames_per_second == pytest.approx(90 / 30.0)
    weighted = sum((w.confidence_mean or 0) * w.frames.inferred for w in ws) / 90
    assert act.confidence_mean == pytest.approx(weighted)


def test_model_serving_counts_devices_and_averages_estimates_on_their_model(store: Store) -> None:
    v1, v2 = model_ref("m", "1.0.0"), model_ref("m", "2.0.0")
    for device, model in (("a", v1), ("b", v1), ("c", v2)):
        store.add_windows(windows(device, 1, fleet="f", model=model))
    store.add_windows(windows("z", 1, fleet="other", model=v1))  # another fleet
    # b's estimate was made on another model than the one it serves now: it does not count for v1
    put_device_health(
        store,
        "f",
        {"a": _health(v1.sha256, 0.9), "b": _health(v2.sha256, 0.5), "c": _health(v2.sha256, 0.7)},
        1.0,
    )
    got = {(m.model, m.version): (m.devices, m.estimated_accuracy) for m in model_serving(store, "f")}
    assert got == {("m", "1.0.0"): (2, pytest.approx(0.9)), ("m", "2.0.0"): (1, pytest.approx(0.7))}


def test_a_forgotten_device_comes_back_only_with_a_newer_message(store: Store) -> None:
    """forget_device: the device row and its health go, an audit entry stays; its last will and a late
    window from before the removal are stored but revive nothing; a newer status brings it back."""
    model = model_ref("m", "1.0.0")
    store.add_windows(windows("cam-1", 2, fleet="f", model=model, start=1000.0))
    store.add_windows(windows("cam-2", 1, fleet="f", model=model, start=1000.0))
    store.add_statuses([Status(fleet="f", device="cam-1", state="online", session=1, ts=1000.0)])
    put_device_health(store, "f", {"cam-1": _health(model.sha256, 0.9)}, 1.0)
    with pytest.raises(UnknownDeviceError, match="no device 'cam-9' in fleet 'f'$"):
        forget_device(store, "f", "cam-9", actor="alice")
    with pytest.raises(UnknownDeviceError, match="no device 'cam-1' in fleet 'g' \\(it is in fleet 'f'\\)"):
        forget_device(store, "g", "cam-1", actor="alice")
    removed_at = time.time()
    row = forget_device(store, "f", "cam-1", actor="alice", reason="stolen", now=removed_at)
    assert row.device == "cam-1" and row.fleet == "f"
    assert [d.device for d in store.devices("f")] == ["cam-2"]
    assert device_health(store, "cam-1") is None
    assert removed_devices(store, "f") == {"cam-1": pytest.approx(removed_at)}
    [entry] = store.audit_log(action="device.forget")
    assert entry.actor == "alice" and entry.subject == "device/cam-1" and "stolen" in (entry.details or "")
    # the service's next health step does not bring its health back either
    assert put_device_health(store, "f", {"cam-1": _health(model.sha256, 0.9)}, 2.0) == set()
    assert device_health(store, "cam-1") is None

    will = Status(fleet="f", device="cam-1", state="offline", session=1, ts=1000.0)  # its last will
    late = windows("cam-1", 1, fleet="f", model=model, start=1100.0, first_seq=7)  # spooled, sent late
    assert store.add_statuses([will]).stored == 1 and store.add_windows(late).stored == 1
    assert store.device("cam-1") is None and removed_devices(store, "f") == {
        "cam-1": pytest.approx(removed_at)
    }

    back = Status(fleet="f", device="cam-1", state="online", session=2, ts=removed_at + 5)
    store.add_statuses([back])
    device = store.device("cam-1")
    assert device is not None and device.state == "online" and removed_devices(store, "f") == {}
