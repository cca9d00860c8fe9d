"""The fleet's current state as monitoring reads it (Prometheus metrics, Home Assistant), and removing a
device from its fleet.

Every query here answers "now" for one fleet in a few indexed statements, so a scrape of a fleet of
thousands of devices stays cheap: devices with their health, devices and mean estimate per model version,
the latest canary's state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import and_, delete, func, select

from trainer.errors import UnknownDeviceError
from trainer.store.console_queries import device_query
from trainer.store.engine import insert
from trainer.store.records import insert_audit
from trainer.store.schema import Device, DeviceHealthRecord, ModelRecord, Release, RemovedDevice, Rollout
from trainer.store.store import Store

ROLLOUT_STATES = ("none", "canary", "promoted", "rolled_back")
"""What a fleet's latest canary is doing (``none`` before its first canary)."""
_ROLLOUT_STATE_OF = {
    "active": "canary",
    "promoted": "promoted",
    "rolled_back": "rolled_back",
    "aborted": "rolled_back",
}


@dataclass(frozen=True)
class ModelServing:
    """One model version and the devices of a fleet serving it now."""

    model: str
    version: str
    devices: int
    estimated_accuracy: float | None
    """Mean of the service's estimates for those devices on this very model (None without any)."""


@dataclass(frozen=True)
class CanaryState:
    """The fleet's latest canary rollout: its state (one of :data:`ROLLOUT_STATES`) and candidate."""

    state: str
    model: str
    version: str
    started_at: float


def device_rows(store: Store, fleet: str) -> list[tuple[Device, DeviceHealthRecord | None]]:
    """Every device of ``fleet`` with its health row (None before the service judged it)."""
    q = device_query(fleet, None, None, None).order_by(Device.device)
    with store.read_session() as s:
        return [(d, h) for d, h in s.execute(q).all()]


def model_serving(store: Store, fleet: str) -> list[ModelServing]:
    """Per model version some device of ``fleet`` serves now: how many do, and their mean estimate
    (only estimates made on that model count)."""
    q = (
        select(
            Device.model_name,
            Device.model_version,
            func.count(),
            func.avg(DeviceHealthRecord.estimated_accuracy),
        )
        .outerjoin(
            DeviceHealthRecord,
            and_(
                DeviceHealthRecord.device == Device.device,
                DeviceHealthRecord.model_sha256 == Device.model_sha256,
            ),
        )
        .where(Device.fleet == fleet, Device.model_name.is_not(None), Device.model_version.is_not(None))
        .group_by(Device.model_name, Device.model_version)
        .order_by(Device.model_name, Device.model_version)
    )
    with store.engine.connect() as conn:
        return [
            ModelServing(str(m), str(v), int(n), float(acc) if acc is not None else None)
            for m, v, n, acc in conn.execute(q)
        ]


def latest_canary(store: Store, fleet: str) -> CanaryState | None:
    """The newest canary rollout of ``fleet`` (None before the first one)."""
    q = (
        select(Rollout.state, ModelRecord.name, ModelRecord.version, Rollout.started_at)
        .join(Release, Release.id == Rollout.release_id)
        .join(ModelRecord, ModelRecord.sha256 == Release.model_sha256)
        .where(Rollout.fleet == fleet, Rollout.cohort.like("canary%"))
        .order_by(Rollout.id.desc())
        .limit(1)
    )
    with store.engine.connect() as conn:
        row = conn.execute(q).first()
    if row is None:
        return None
    state, model, version, started = row
    return CanaryState(_ROLLOUT_STATE_OF.get(state, "rolled_back"), model, version, float(started))


def forget_device(
    store: Store, fleet: str, device: str, *, actor: str, reason: str | None = None, now: float | None = None
) -> Device:
    """Remove ``device`` from ``fleet``: its device and health rows go (it leaves the console's fleet page,
    the metrics and Home Assistant), a :class:`RemovedDevice` row and an audit entry say who and when; its
    windows, statuses and samples stay. Returns the row it had; UnknownDeviceError if it is not there."""
    at = time.time() if now is None else now
    with store.write() as conn:
        row = conn.execute(select(Device.__table__).where(Device.device == device)).first()
        if row is None or row.fleet != fleet:
            known = f" (it is in fleet {row.fleet!r})" if row is not None else ""
            raise UnknownDeviceError(f"no device {device!r} in fleet {fleet!r}{known}")
        conn.execute(delete(DeviceHealthRecord).where(DeviceHealthRecord.device == device))
        conn.execute(delete(Device).where(Device.device == device))
        values = {"fleet": fleet, "removed_at": at, "removed_by": actor, "reason": reason}
        stmt = insert(conn, RemovedDevice.__table__).values(device=device, **values)
        conn.execute(stmt.on_conflict_do_update(index_elements=["device"], set_=values))
        insert_audit(conn, actor, "device.forget", f"device/{device}", {"fleet": fleet, "reason": reason}, at)
    return Device(**row._asdict())


def removed_devices(store: Store, fleet: str) -> dict[str, float]:
    """Devices removed from ``fleet`` that have not come back (device -> when it was removed)."""
    back = select(Device.device).where(Device.device == RemovedDevice.device).exists()
    q = select(RemovedDevice.device, RemovedDevice.removed_at).where(RemovedDevice.fleet == fleet, ~back)
    with store.engine.connect() as conn:
        return {d: float(at) for d, at in conn.execute(q)}
