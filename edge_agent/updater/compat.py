"""Can this device run this release? Pure checks on verified release metadata, before any download."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from edge_agent.package import FORMAT as PACKAGE_FORMAT
from edge_agent.package import PreprocessSpec
from edge_agent.updater.errors import UpdateRejected
from edge_agent.updater.release_info import ReleaseInfo


@dataclass(frozen=True)
class DeviceProfile:
    """What the device is and can do, as the compatibility check needs it."""

    fleet: str
    model: str
    """The model name this device follows."""
    agent_version: str
    runtimes: frozenset[str]
    """Runtimes installed here (``onnxruntime``, ``litert``)."""
    artifact: str = "auto"
    """A forced artifact key, or ``auto`` (any runnable one)."""
    hardware: frozenset[str] = field(default_factory=frozenset)
    max_target_bytes: int = 256 * 1024 * 1024


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.10.2rc1"`` -> ``(1, 10, 2)``: numeric release parts only, for ordering agent versions."""
    out = []
    for part in version.split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def check_compatible(info: ReleaseInfo, length: int, device: DeviceProfile) -> None:
    """Raise :class:`UpdateRejected` (permanent) naming the first incompatibility; return if none."""

    def no(reason: str, detail: str) -> UpdateRejected:
        return UpdateRejected(reason, detail, permanent=True, about_metadata=True)

    if info.fleet != device.fleet:
        raise no("wrong_fleet", f"release is for fleet {info.fleet!r}, this device is in {device.fleet!r}")
    if info.model != device.model:
        raise no("wrong_model", f"release is model {info.model!r}, this device follows {device.model!r}")
    if length > device.max_target_bytes:
        raise no(
            "too_large", f"target is {length} bytes, the device accepts at most {device.max_target_bytes}"
        )
    if version_tuple(device.agent_version) < version_tuple(info.min_agent_version):
        raise no(
            "agent_too_old",
            f"release needs agent >= {info.min_agent_version}, this is {device.agent_version}",
        )
    if info.package_format != PACKAGE_FORMAT:
        raise no(
            "package_format", f"package format {info.package_format!r}, this agent reads {PACKAGE_FORMAT!r}"
        )
    if device.artifact != "auto":
        runtime = info.formats.get(device.artifact)
        if runtime is None:
            raise no(
                "no_runnable_format", f"device runs {device.artifact!r}; release has {sorted(info.formats)}"
            )
        if runtime not in device.runtimes:
            raise no(
                "no_runnable_format", f"artifact {device.artifact!r} needs {runtime!r}, not installed here"
            )
    elif not set(info.formats.values()) & device.runtimes:
        raise no(
            "no_runnable_format",
            f"release needs one of {sorted(set(info.formats.values()))}; "
            f"installed: {sorted(device.runtimes)}",
        )
    try:
        PreprocessSpec.model_validate_json(info.preprocess)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise no("preprocess_unsupported", f"preprocess.{loc}: {first['msg']}") from None
    if info.hardware and not set(info.hardware) & device.hardware:
        raise no(
            "hardware_mismatch",
            f"release supports {sorted(info.hardware)}; device is {sorted(device.hardware)}",
        )
