"""What a release says about itself: the ``custom`` fields of its TUF target, shared by trainer and device.

The trainer writes them when it signs a release; the device reads them from *verified* TUF metadata
before it downloads anything, so incompatible, foreign or downgraded releases are refused without
fetching a byte of the artifact. Target paths follow one naming rule, :func:`target_path`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import EdgeFleetError
from edge_agent.protocol import Identifier
from edge_agent.updater.cohort import Cohort

CUSTOM_KEY = "edgefleet"
"""Key of our fields inside a target's ``custom`` object."""
ARCHIVE_SUFFIX = ".tar"


def target_path(channel: str, fleet: str, model: str) -> str:
    """The TUF target path of a channel's current release of ``model`` for ``fleet``."""
    return f"{channel}/{fleet}/{model}{ARCHIVE_SUFFIX}"


def metadata_key(path: str, target_sha256: str, custom: Any) -> str:
    """What a refusal caused by the metadata is remembered by: the target path, its hash and its signed
    custom fields, so a corrected release of the same archive (other fields) is a different key."""
    text = json.dumps({"path": path, "sha256": target_sha256, "custom": custom}, sort_keys=True, default=str)
    return "metadata:" + hashlib.sha256(text.encode()).hexdigest()


class ReleaseInfo(BaseModel):
    """Custom fields of one release target (``custom.edgefleet`` in the signed targets metadata)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["edgefleet.release/1"] = "edgefleet.release/1"
    fleet: Identifier
    channel: Identifier
    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=32)
    release: int = Field(ge=1)
    """Repository-wide release counter: every publish, promotion and roll-forward takes the next one."""
    package_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the package's model.json (the package identity; covers every file)."""
    package_format: str = "edgefleet.model/1"
    formats: dict[str, str] = Field(min_length=1)
    """Artifact key -> runtime, e.g. {"tflite-int8": "litert", "onnx-int8": "onnxruntime"}."""
    preprocess: str = Field(max_length=4096)
    """The package's preprocessing spec as JSON text (TUF's canonical JSON has no floats); the device
    must understand every field."""
    min_agent_version: str = "0"
    hardware: list[str] = Field(default_factory=list)
    """Hardware tags this release supports (any one suffices); empty means every device."""
    action: Literal["release", "promote", "rollback"] = "release"
    source_release: int | None = None
    """For promote and rollback: the release whose artifact this one re-publishes."""
    published: int = 0
    """Unix time of signing (whole seconds: canonical JSON has no floats)."""
    cohort: Cohort | None = None
    """For canary releases: the share of the fleet that takes it (devices with ``channel: auto``)."""


def preprocess_text(spec: dict[str, Any]) -> str:
    """The canonical text of a preprocessing spec, as stored in :attr:`ReleaseInfo.preprocess`."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


class ReleaseInfoError(EdgeFleetError, ValueError):
    """A target's custom fields are missing or invalid."""


def parse_release_info(custom: Any) -> ReleaseInfo:
    """The :class:`ReleaseInfo` inside a target's ``custom`` value; :class:`ReleaseInfoError` if absent or bad."""
    if not isinstance(custom, dict) or CUSTOM_KEY not in custom:
        raise ReleaseInfoError(f"target has no custom.{CUSTOM_KEY} fields")
    try:
        return ReleaseInfo.model_validate(custom[CUSTOM_KEY])
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ReleaseInfoError(f"custom.{CUSTOM_KEY}.{loc}: {first['msg']}") from None
