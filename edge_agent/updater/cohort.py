"""Canary cohorts: which devices take a canary release, decided by a stable hash of the device id.

The cohort (share of the fleet and a salt) is part of the *signed* release fields, so devices trust only
verified metadata; trainer and devices compute membership with the same function, so the trainer knows
which devices are canaries without asking them.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field

BASIS_POINTS = 10_000
AUTO_CHANNELS = ("stable", "canary")
"""Channels a device follows with ``update.channel: auto``."""


def followed_channels(channel: str) -> tuple[str, ...]:
    """The channels a device configured with ``channel`` follows."""
    return AUTO_CHANNELS if channel == "auto" else (channel,)


class Cohort(BaseModel):
    """A share of the fleet (basis points: TUF's canonical JSON has no floats) and the hash salt."""

    model_config = ConfigDict(extra="forbid")
    share_bp: int = Field(ge=0, le=BASIS_POINTS)
    salt: str = Field(min_length=1, max_length=64)

    @classmethod
    def of_share(cls, share: float, salt: str) -> Cohort:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"canary share must be within [0, 1], got {share}")
        return cls(share_bp=int(round(share * BASIS_POINTS)), salt=salt)


def cohort_position(device: str, salt: str) -> int:
    """The device's stable position in [0, 10000) for a salt."""
    digest = hashlib.sha256(f"{salt}\x00{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BASIS_POINTS


def in_cohort(device: str, cohort: Cohort) -> bool:
    """Whether ``device`` belongs to ``cohort``; growing the share only ever adds devices."""
    return cohort_position(device, cohort.salt) < cohort.share_bp
