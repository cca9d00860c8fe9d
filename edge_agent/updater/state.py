"""The updater's persistent state and its transitions: pure data, no I/O (see :mod:`.store` for that).

Slots: ``factory`` is the package provisioned with the device (config ``model.package``, read-only);
``a`` and ``b`` are the two directories the updater writes. A new release is always written into the
slot that the committed model does not use, so the committed model is never touched while an update
runs. The lifecycle of one release::

    begin_staging (slot marked "writing": its content is untrusted)
      -> mark_staged (archive verified by TUF, unpacked, every file's sha256 checked)
      -> start_trial (max_release raised, attempt counted; persisted *before* the hot swap)
      -> commit (committed <- trial, previous <- old committed)   or   rollback (never retried)

A power cut at any instant leaves a state whose ``committed`` (else ``previous``, else ``factory``)
slot holds a complete, verified package; :meth:`UpdateStateData.abandon_interrupted` turns a trial
that never committed back into the committed model on the next start.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SlotName = Literal["factory", "a", "b"]
WritableSlot = Literal["a", "b"]
MAX_REJECTED = 200


class Installed(BaseModel):
    """A package in a slot, with the release it came from (0 for the factory package)."""

    model_config = ConfigDict(extra="forbid")
    slot: SlotName
    package_sha256: str
    model: str
    version: str
    release: int = 0
    target: str | None = None
    target_sha256: str | None = None
    started: float | None = None
    """For a trial: when it was swapped in."""


class Staging(BaseModel):
    """A release being written into a slot (``writing``) or written and verified (``staged``)."""

    model_config = ConfigDict(extra="forbid")
    slot: WritableSlot
    phase: Literal["writing", "staged", "verifying"]
    """``verifying``: its attempt is counted, so an agent killed by the model while verifying it does
    not retry it for ever."""
    target: str
    target_sha256: str
    release: int
    package_sha256: str
    model: str
    version: str


class Rejection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    release: int
    reason: str
    ts: float


class UpdateStateData(BaseModel):
    """Everything the updater must remember across restarts and power cuts."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["edgefleet.update-state/1"] = "edgefleet.update-state/1"
    committed: Installed | None = None
    previous: Installed | None = None
    staging: Staging | None = None
    trial: Installed | None = None
    max_release: int = Field(default=0, ge=0)
    """Highest release counter ever swapped in: anything at or below it is a downgrade."""
    rejected: dict[str, Rejection] = Field(default_factory=dict)
    """Target sha256 -> why it was refused; these are never tried again."""
    attempts: dict[str, int] = Field(default_factory=dict)
    """Target sha256 -> trials started (a trial interrupted again and again is given up)."""

    # -- queries ---------------------------------------------------------------------------------
    def boot_order(self) -> list[Installed]:
        """Slots to try at start, best first: committed, previous (distinct slots only)."""
        out: list[Installed] = []
        for inst in (self.committed, self.previous):
            if inst is not None and all(inst.slot != o.slot for o in out):
                out.append(inst)
        return out

    def staging_slot(self) -> WritableSlot:
        """The writable slot the committed model does not use (prefer one the fallback does not use)."""
        used = self.committed.slot if self.committed else "factory"
        free: list[WritableSlot] = [s for s in ("a", "b") if s != used]
        keep = self.previous.slot if self.previous else None
        return next((s for s in free if s != keep), free[0])

    def is_rejected(self, target_sha256: str) -> bool:
        return target_sha256 in self.rejected

    def problems(self) -> list[str]:
        """Invariant violations (empty when consistent); tests and the boot path check these."""
        out = []
        if self.committed is None:
            out.append("no committed model")
            return out
        for name, other in (("trial", self.trial), ("staging", self.staging)):
            if other is not None and other.slot == self.committed.slot:
                out.append(f"{name} uses the committed slot {other.slot}")
        if self.trial is not None and self.staging is not None:
            out.append("a trial and a staging at once")
        if self.committed.release > self.max_release:
            out.append(f"committed release {self.committed.release} above max_release {self.max_release}")
        if self.trial is not None and self.trial.release > self.max_release:
            out.append(f"trial release {self.trial.release} above max_release {self.max_release}")
        if self.previous is not None and self.previous.slot == self.committed.slot:
            out.append("previous and committed share a slot")
        return out

    # -- transitions -----------------------------------------------------------------------------
    def ensure_committed(self, factory: Installed) -> None:
        """First start: the factory package is the committed model."""
        if self.committed is None:
            self.committed = factory

    def begin_staging(
        self,
        slot: WritableSlot,
        *,
        target: str,
        target_sha256: str,
        release: int,
        package_sha256: str,
        model: str,
        version: str,
    ) -> None:
        """Claim ``slot`` for a new release; whatever it held (an old fallback) is forgotten first."""
        if self.previous is not None and self.previous.slot == slot:
            self.previous = None
        self.staging = Staging(
            slot=slot,
            phase="writing",
            target=target,
            target_sha256=target_sha256,
            release=release,
            package_sha256=package_sha256,
            model=model,
            version=version,
        )

    def begin_verifying(self) -> None:
        """Count an install attempt before the package is loaded and self-tested (they may crash us)."""
        s = self.staging
        assert s is not None and s.phase in ("staged", "verifying")
        s.phase = "verifying"
        self.attempts[s.target_sha256] = self.attempts.get(s.target_sha256, 0) + 1

    def mark_staged(self) -> None:
        assert self.staging is not None
        self.staging.phase = "staged"

    def start_trial(self, now: float) -> Installed:
        """The staged release becomes the trial; its counter becomes the new floor."""
        s = self.staging
        assert s is not None and s.phase == "verifying", "begin_verifying() counts the attempt first"
        self.trial = Installed(
            slot=s.slot,
            package_sha256=s.package_sha256,
            model=s.model,
            version=s.version,
            release=s.release,
            target=s.target,
            target_sha256=s.target_sha256,
            started=now,
        )
        self.staging = None
        self.max_release = max(self.max_release, s.release)
        return self.trial

    def commit(self) -> Installed:
        """The trial passed its health window: it becomes the committed model."""
        t = self.trial
        assert t is not None
        t.started = None
        self.previous, self.committed, self.trial = self.committed, t, None
        if t.target_sha256:
            self.attempts.pop(t.target_sha256, None)
        return t

    def rollback(self, reason: str, now: float) -> Installed:
        """The trial failed: back to the committed model; the release is never retried."""
        t = self.trial
        assert t is not None
        self.trial = None
        if t.target_sha256:
            self.reject(t.target_sha256, t.release, reason, now)
        return t

    def drop_staging(self) -> None:
        self.staging = None

    def reject(self, target_sha256: str, release: int, reason: str, now: float) -> None:
        """Remember a refused release (bounded: the oldest entries go first)."""
        self.rejected[target_sha256] = Rejection(release=release, reason=reason, ts=now)
        self.attempts.pop(target_sha256, None)
        if len(self.rejected) > MAX_REJECTED:
            oldest = sorted(self.rejected, key=lambda k: self.rejected[k].ts)[
                : len(self.rejected) - MAX_REJECTED
            ]
            for k in oldest:
                del self.rejected[k]

    def record_release(self, release: int) -> None:
        """A newer release carries exactly the package already committed (a roll-forward): adopt its counter."""
        assert self.committed is not None
        self.committed.release = max(self.committed.release, release)
        self.max_release = max(self.max_release, release)

    def abandon_interrupted(self, max_attempts: int, now: float) -> Installed | None:
        """At start: a trial that never committed is dropped (the committed model boots instead).

        A release whose trials were interrupted ``max_attempts`` times is rejected for good (it may be
        what crashes the agent); otherwise its slot is kept as staged, so the next check re-verifies it
        instead of downloading it again. A slot still being written is forgotten (its content is untrusted).
        """
        if self.staging is not None and self.staging.phase == "writing":
            self.staging = None
        s = self.staging
        if s is not None and s.phase == "verifying":  # the agent died while loading or testing it
            if self.attempts.get(s.target_sha256, 0) >= max_attempts:
                self.reject(s.target_sha256, s.release, "interrupted", now)
                self.staging = None
            else:
                s.phase = "staged"
        t = self.trial
        if t is None:
            return None
        self.trial = None
        if t.target_sha256 and self.attempts.get(t.target_sha256, 0) >= max_attempts:
            self.reject(t.target_sha256, t.release, "interrupted", now)
        elif (
            t.slot != "factory" and t.target and t.target_sha256
        ):  # the slot still holds the verified package
            self.staging = Staging(
                slot=t.slot,
                phase="staged",
                target=t.target,
                target_sha256=t.target_sha256,
                release=t.release,
                package_sha256=t.package_sha256,
                model=t.model,
                version=t.version,
            )
        return t
