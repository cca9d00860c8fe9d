"""The device updater: verified release -> slot -> self-test -> hot swap -> health window -> commit or rollback.

One thread per agent. It wakes on a release hint (MQTT), on the poll interval, and on every telemetry
window the agent closes. A check is::

    TUF refresh (pinned root) -> target info (verified custom fields) -> not rejected before, release
    counter above every release installed before, compatible -> resumable, length-capped download,
    hashes checked -> unpack into the free slot, every file verified -> load a second backend
    instance, self-test (golden top-1, finite probabilities, latency) -> persist "trial", hot swap at
    a frame boundary -> N health windows -> persist "committed"   |   swap back, persist, never retry

Every state change is persisted first (atomically) and then published on ``update`` (QoS 1 via the
spool). Anything refused leaves the current model serving. Example (the agent does this)::

    boot = select_boot(store, cfg.model.package)
    updater = Updater(cfg.update, identity, store, boot, publish=publish_event)
    updater.start(pipeline); updater.on_window(window); updater.on_hint(topic, payload); updater.stop()
"""

from __future__ import annotations

import logging
import platform
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tuf.api.metadata import TargetFile

from edge_agent import __version__
from edge_agent.backends.base import BackendOptions, available_runtimes
from edge_agent.backends.select import choose_artifact
from edge_agent.config import UpdateSettings
from edge_agent.errors import EdgeFleetError, PackageError
from edge_agent.events import EventCounter
from edge_agent.package import ModelPackage, load_package
from edge_agent.pipeline import LoadedModel
from edge_agent.protocol import (
    MessageError,
    ModelRef,
    ReleaseHint,
    TelemetryWindow,
    UpdateEvent,
    parse_message,
    release_topic,
)
from edge_agent.selftest import runnable_artifacts, self_test, self_test_in_child
from edge_agent.state import AgentState
from edge_agent.updater.archive import ArchiveError, unpack_archive
from edge_agent.updater.boot import Boot
from edge_agent.updater.cohort import followed_channels, in_cohort
from edge_agent.updater.compat import DeviceProfile, check_compatible
from edge_agent.updater.errors import Unreachable, UpdateRejected
from edge_agent.updater.health import HealthPolicy, HealthWindow
from edge_agent.updater.release_info import (
    ReleaseInfo,
    ReleaseInfoError,
    metadata_key,
    parse_release_info,
    preprocess_text,
    target_path,
)
from edge_agent.updater.store import UpdateStore
from edge_agent.updater.tufclient import ReleaseRepositoryClient

log = logging.getLogger(__name__)


class ModelHost(Protocol):
    """What the updater swaps models in (the agent's :class:`~edge_agent.pipeline.Pipeline`)."""

    @property
    def active(self) -> LoadedModel: ...

    def swap(self, model: LoadedModel) -> LoadedModel: ...


@dataclass(frozen=True)
class Identity:
    """Who this device is, for events and compatibility."""

    fleet: str
    device: str
    session: int
    artifact: str = "auto"
    backend: BackendOptions = field(default_factory=BackendOptions)


@dataclass
class _Trial:
    model: LoadedModel
    previous: LoadedModel
    health: HealthWindow
    info: ReleaseInfo


class Updater:
    """Runs update checks on its own thread; the agent feeds it hints and closed telemetry windows."""

    def __init__(
        self,
        settings: UpdateSettings,
        identity: Identity,
        store: UpdateStore,
        boot: Boot,
        *,
        publish: Callable[[UpdateEvent], None],
        agent_state: AgentState | None = None,
        events: EventCounter | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.store = store
        self.state = boot.state
        self.boot = boot
        self.host: ModelHost | None = None
        self._publish = publish
        self.agent_state = agent_state
        self.events = events or EventCounter()
        self.track = settings.model or boot.package.manifest.name
        self.channels = followed_channels(settings.channel)
        self.track_targets = [target_path(ch, identity.fleet, self.track) for ch in self.channels]
        self.hint_topics = frozenset(release_topic(identity.fleet, ch) for ch in self.channels)
        self.repo = ReleaseRepositoryClient(
            settings.repository,
            settings.root,
            store.tuf,
            timeout_s=settings.http_timeout_s,
            deadline_s=settings.fetch_deadline_s,
        )
        self.profile = DeviceProfile(
            fleet=identity.fleet,
            model=self.track,
            agent_version=__version__,
            runtimes=frozenset(available_runtimes()),
            artifact=identity.artifact,
            hardware=frozenset(settings.hardware if settings.hardware is not None else [platform.machine()]),
            max_target_bytes=settings.max_target_bytes,
        )
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trial: _Trial | None = None
        self._pending_hint: ReleaseHint | None = None
        self._reported: set[tuple[str, str]] = set()
        self._seq = 0

    # -- public API ------------------------------------------------------------------------------
    def start(self, host: ModelHost) -> Updater:
        """Report the boot decision and start the update thread, swapping models in ``host``.

        Hints that arrived before (the retained one comes right after connecting) are queued.
        """
        self.host = host
        self._announce_boot()
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step (a running download or self-test finishes first, bounded).

        A trial still running is not judged: the next start boots the committed model and tries the
        staged release again, and this orderly stop does not count as one of its interrupted attempts.
        """
        self._stop.set()
        self._queue.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("updater still busy after %.0f s; stopping without it", timeout)
                return
        t, st = self._trial, self.state
        if t is not None and st.trial is not None and st.trial.target_sha256 in st.attempts:
            st.attempts[st.trial.target_sha256] -= 1
            self.store.save(st)
        self.repo.close()

    def on_hint(self, topic: str, payload: bytes) -> None:
        """A release hint arrived; raises MessageError (counted by the link) if it is malformed."""
        hint = parse_message(topic, payload, ReleaseHint)
        assert isinstance(hint, ReleaseHint)
        if hint.fleet != self.identity.fleet or hint.channel not in self.channels:
            raise MessageError(
                f"{topic}: hint for {hint.fleet}/{hint.channel} on this device's channel topic"
            )
        self._queue.put(("hint", hint))

    def on_window(self, window: TelemetryWindow) -> None:
        """A telemetry window closed (called from the agent loop; never blocks)."""
        if self._trial is not None:
            self._queue.put(("window", window))

    def check_now(self, host: ModelHost, target: str | None = None) -> None:
        """Run one check synchronously on the caller's thread (benchmarks and tools; not with start())."""
        if self.host is None:
            self.host = host
            self._announce_boot()
        self._check(target, from_hint=target is not None)

    @property
    def _host(self) -> ModelHost:
        assert self.host is not None, "Updater.start(host) first"
        return self.host

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        s = self.settings
        next_poll = (
            time.monotonic() if s.poll_on_start else time.monotonic() + (s.poll_seconds or float("inf"))
        )
        if not s.poll_seconds and not s.poll_on_start:
            next_poll = float("inf")
        while not self._stop.is_set():
            timeout = max(0.0, min(next_poll - time.monotonic(), 1.0))
            try:
                kind, item = self._queue.get(timeout=timeout)
            except queue.Empty:
                kind, item = "tick", None
            try:
                if kind == "window":
                    self._judge(item)
                elif kind == "hint":
                    self._pending_hint = item
                if self._trial is None and not self._stop.is_set():
                    if self._pending_hint is not None:
                        hint, self._pending_hint = self._pending_hint, None
                        self._on_hint(hint)
                    elif time.monotonic() >= next_poll:
                        self._check(None, from_hint=False)
                        next_poll = time.monotonic() + (s.poll_seconds or float("inf"))
            except Exception:  # noqa: BLE001 - the updater must never take the agent down
                log.exception("updater step failed; the current model keeps serving")

    def _on_hint(self, hint: ReleaseHint) -> None:
        if len(self.channels) > 1:  # auto: the best eligible release of every channel, not the hinted one
            if hint.target.split("/", 1)[0] != hint.channel or hint.target not in self.track_targets:
                # A hint naming another channel's target (or one not followed) is answered with the reason
                # the device does not take it; a canary hint outside the cohort is normal and stays quiet.
                self._check(hint.target, from_hint=True, explain_only=True)
            self._check(None, from_hint=False)
            return
        st = self.state
        resumable = st.staging is not None and st.staging.target_sha256 == hint.sha256
        if st.is_rejected(hint.sha256):
            log.debug("hint for release %d ignored: rejected before", hint.release)
            return
        if hint.release < st.max_release or (hint.release == st.max_release and not resumable):
            log.debug("hint for release %d ignored: not above %d", hint.release, st.max_release)
            return
        self._check(hint.target, from_hint=True)

    # -- one check -------------------------------------------------------------------------------
    def _check(self, target: str | None, *, from_hint: bool, explain_only: bool = False) -> None:
        """Check ``target`` (None: the best one this device follows) and install it if it may; with
        ``explain_only``, only report why the device does not take ``target`` (nothing if it would)."""
        path = target or self._best_target()
        if path is None:
            return
        info: ReleaseInfo | None = None
        sha: str | None = None
        meta_key: str | None = None
        try:
            if path not in self.track_targets:  # a hint may name any target: only the followed ones count
                raise UpdateRejected(
                    "not_followed",
                    f"{path} is not a target this device follows ({', '.join(self.track_targets)})",
                )
            tinfo = self.repo.targetinfo(path)
            if tinfo is None:
                if from_hint:
                    raise UpdateRejected("unknown_target", f"{path} is not in the signed metadata")
                return
            sha = tinfo.hashes.get("sha256")
            if not sha:
                raise UpdateRejected("metadata_invalid", f"{path}: no sha256 hash")
            meta_key = metadata_key(path, sha, tinfo.custom)
            if self.state.is_rejected(meta_key):
                return  # reported when it was rejected; a corrected release has other metadata
            try:
                info = parse_release_info(tinfo.custom)
            except ReleaseInfoError as exc:
                raise UpdateRejected(
                    "bad_release_info", str(exc), permanent=True, about_metadata=True
                ) from None
            if explain_only:
                self._check_followed(path, info)
                return
            self._consider(tinfo, info, sha, from_hint)
        except UpdateRejected as r:
            self._rejected(r, path, info, sha, meta_key if r.about_metadata else sha, always=from_hint)
        except Unreachable as exc:
            self.events.add("update_unreachable")
            log.warning("release repository unreachable: %s", exc)
        finally:
            self.repo.close()

    def _best_target(self) -> str | None:
        """The target to check: the only channel's, or under ``auto`` the eligible release with the highest
        counter (stable always; canary when this device is in the release's signed cohort). A channel
        whose metadata fails verification is reported and skipped."""
        if len(self.track_targets) == 1:
            return self.track_targets[0]
        best: tuple[int, str] | None = None
        for path in self.track_targets:
            try:
                tinfo = self.repo.targetinfo(path)
            except Unreachable as exc:
                self.events.add("update_unreachable")
                log.warning("release repository unreachable: %s", exc)
                return None
            except UpdateRejected as r:  # bad signature, expired, replayed: as on a one-channel device
                self._rejected(r, path, None, None, None, always=False)
                continue
            release = self._eligible_release(path, tinfo) if tinfo is not None else None
            if release is not None and (best is None or release > best[0]):
                best = (release, path)
        return best[1] if best else None

    def _eligible_release(self, path: str, tinfo: TargetFile) -> int | None:
        """Under ``auto``, the release counter of ``path`` if this device may take it, else None. A release
        whose signed fields do not fit (malformed, another channel's) is reported once and skipped, so it
        cannot hold back the other channel's release."""
        sha = tinfo.hashes.get("sha256", "")
        if self.state.is_rejected(sha) or self.state.is_rejected(metadata_key(path, sha, tinfo.custom)):
            return None
        try:
            if not sha:
                raise ReleaseInfoError(f"{path}: no sha256 hash")
            info = parse_release_info(tinfo.custom)
            self._check_followed(path, info)
        except (UpdateRejected, ReleaseInfoError) as exc:
            if getattr(exc, "reason", None) != "not_in_cohort":  # outside the cohort is normal, quiet
                self._check(path, from_hint=False, explain_only=True)  # reports it (and remembers)
            return None
        return info.release

    def _consider(self, tinfo: TargetFile, info: ReleaseInfo, sha: str, from_hint: bool) -> None:
        st = self.state
        if st.is_rejected(sha):
            return  # reported when it was rejected
        self._check_followed(tinfo.path, info)  # before anything, even a counter, is recorded from it
        committed = st.committed
        assert committed is not None
        if info.package_sha256 == committed.package_sha256:
            if info.release > committed.release:  # a roll-forward onto what already runs
                st.record_release(info.release)
                self.store.save(st)
                self._event(
                    "active",
                    reason="already_running",
                    info=info,
                    target=tinfo.path,
                    model=self._host.active.ref,
                )
            return
        resumable = (
            st.staging is not None and st.staging.target_sha256 == sha and st.staging.phase == "staged"
        )
        if info.release < st.max_release or (info.release == st.max_release and not resumable):
            raise UpdateRejected(
                "release_rollback",
                f"release {info.release} is not above {st.max_release}, the highest installed on this device",
            )
        check_compatible(info, tinfo.length, self.profile)
        pkg = self._stage(tinfo, info, sha, resumable)
        st.begin_verifying()
        self.store.save(st)  # the attempt counts before the model can crash or hang us
        loaded = self._verify(pkg, info)
        self._start_trial(loaded, info)

    def _check_followed(self, path: str, info: ReleaseInfo) -> None:
        """The release's signed channel is the channel of its target path (one this device follows), and
        under ``auto`` a canary release's signed cohort includes this device (a hint, a target path or a
        channel label alone decides nothing: a canary key labelling its release ``stable`` is refused)."""
        path_channel = path.split("/", 1)[0]
        if info.channel != path_channel or info.channel not in self.channels:
            raise UpdateRejected(
                "wrong_channel",
                f"{path} is signed as a release of channel {info.channel!r}; this device follows "
                f"{', '.join(self.track_targets)}",
                permanent=True,
                about_metadata=True,
            )
        auto_canary = len(self.channels) > 1 and info.channel != "stable"
        if auto_canary and (info.cohort is None or not in_cohort(self.identity.device, info.cohort)):
            share = f"{info.cohort.share_bp / 100:g}% of the fleet" if info.cohort else "none"
            raise UpdateRejected(
                "not_in_cohort",
                f"{info.channel} release {info.release} ({path}): this device ({self.identity.device}) "
                f"is not in its signed cohort ({share})",
                permanent=True,
                about_metadata=True,
            )

    def _stage(self, tinfo: TargetFile, info: ReleaseInfo, sha: str, resumable: bool) -> ModelPackage:
        """The release's package verified in a writable slot (downloading it unless already staged)."""
        st = self.state
        if resumable:
            assert st.staging is not None
            try:
                pkg = self._verified_slot_package(st.staging.slot, info)
                self._event(
                    "staged",
                    reason="already_staged",
                    info=info,
                    target=tinfo.path,
                    slot=st.staging.slot,
                    model=pkg.ref(),
                )
                return pkg
            except UpdateRejected:
                st.drop_staging()
                self.store.save(st)
        slot = st.staging_slot()
        part = self.store.partial(sha)
        have = part.stat().st_size if part.exists() else 0
        self._event(
            "downloading",
            info=info,
            target=tinfo.path,
            slot=slot,
            detail=f"{tinfo.length} bytes" + (f", resuming at {have}" if have else ""),
        )
        self.repo.download(tinfo, part)
        st.begin_staging(
            slot,
            target=tinfo.path,
            target_sha256=sha,
            release=info.release,
            package_sha256=info.package_sha256,
            model=info.model,
            version=info.version,
        )
        self.store.save(st)
        dest = self.store.clear_slot(slot)
        try:
            unpack_archive(part, dest, max_bytes=self.settings.max_target_bytes)
        except ArchiveError as exc:
            raise UpdateRejected("bad_package", f"{tinfo.path}: {exc}", permanent=True) from None
        pkg = self._verified_slot_package(slot, info)
        st.mark_staged()
        self.store.save(st)
        part.unlink(missing_ok=True)
        self._event("staged", info=info, target=tinfo.path, slot=slot, model=pkg.ref())
        return pkg

    def _verified_slot_package(self, slot: str, info: ReleaseInfo) -> ModelPackage:
        try:
            pkg = load_package(self.store.slot_dir(slot))  # type: ignore[arg-type]
        except PackageError as exc:
            raise UpdateRejected("bad_package", str(exc), permanent=True) from None
        m = pkg.manifest
        if pkg.sha256 != info.package_sha256:
            raise UpdateRejected(
                "bad_package",
                f"package sha256 {pkg.sha256[:12]}... is not the signed {info.package_sha256[:12]}...",
                permanent=True,
            )
        if (m.name, m.version) != (info.model, info.version) or preprocess_text(
            m.preprocess.model_dump(mode="json")
        ) != info.preprocess:
            raise UpdateRejected(
                "bad_package", "model.json disagrees with the signed release fields", permanent=True
            )
        return pkg

    def _verify(self, pkg: ModelPackage, info: ReleaseInfo) -> LoadedModel:
        """Self-test every artifact the device might serve in a child process with a deadline (a model
        whose inference never returns, or that crashes the runtime, is refused there), then load the
        package in a second backend instance and self-test it in this process."""
        ident = self.identity
        candidates = [ident.artifact] if ident.artifact != "auto" else runnable_artifacts(pkg)
        for artifact in candidates:
            isolated = self_test_in_child(
                pkg.root,
                artifact,
                options=ident.backend,
                latency_budget_ms=self.settings.latency_budget_ms,
                deadline_s=self.settings.selftest_timeout_s,
            )
            if not isolated.completed:
                raise UpdateRejected("selftest_failed", f"{artifact}: {isolated.summary()}", permanent=True)
        try:
            current = self._host.active.artifact  # kept unless another eligible one is clearly faster
            choice = choose_artifact(pkg, ident.artifact, ident.backend, self.agent_state, current=current)
            loaded = LoadedModel.load(pkg, choice.artifact, ident.backend)
        except (EdgeFleetError, OSError, ValueError) as exc:
            raise UpdateRejected("selftest_failed", f"cannot load: {exc}", permanent=True) from None
        result = self_test(
            pkg, loaded.artifact, backend=loaded.backend, latency_budget_ms=self.settings.latency_budget_ms
        )
        if not result.passed:
            loaded.close()
            raise UpdateRejected("selftest_failed", f"{loaded.artifact}: {result.summary()}", permanent=True)
        self._event(
            "verified",
            info=info,
            model=loaded.ref,
            selftest_ms=result.latency_ms,
            detail=f"{loaded.artifact}: {result.summary()}",
        )
        return loaded

    def _start_trial(self, loaded: LoadedModel, info: ReleaseInfo) -> None:
        st = self.state
        now = time.time()
        trial = st.start_trial(now)
        self.store.save(st)  # persisted before the swap: a crash from here on boots the committed model
        ref = loaded.package.manifest.reference
        policy = HealthPolicy(
            windows=self.settings.health_windows,
            max_model_failures=self.settings.max_model_failures,
            latency_budget_ms=self.settings.latency_budget_ms,
            min_confidence_ratio=self.settings.min_confidence_ratio,
            reference_confidence=ref.mean_confidence if ref is not None else None,
        )
        previous = self._host.swap(loaded)
        self._trial = _Trial(loaded, previous, HealthWindow(policy, now), info)
        self._event("trial", info=info, target=trial.target, slot=trial.slot, model=loaded.ref, windows=0)
        if self._trial.health.verdict.decision == "commit":
            self._commit()

    # -- the health window -----------------------------------------------------------------------
    def _judge(self, window: TelemetryWindow) -> None:
        t = self._trial
        if t is None:
            return
        verdict = t.health.add(window)
        if verdict.decision == "commit":
            self._commit()
        elif verdict.decision == "rollback":
            self._rollback(verdict.reason or "health", verdict.detail, verdict.windows)

    def _commit(self) -> None:
        t = self._trial
        assert t is not None
        inst = self.state.commit()
        self.store.save(self.state)
        self._trial = None
        self._event(
            "active",
            info=t.info,
            target=inst.target,
            slot=inst.slot,
            model=t.model.ref,
            windows=t.health.passed,
        )
        log.info("committed %s %s (release %d)", t.info.model, t.info.version, t.info.release)

    def _rollback(self, reason: str, detail: str, windows: int) -> None:
        t = self._trial
        assert t is not None
        self._host.swap(t.previous)  # from the next frame on; frames in flight finish on the trial model
        inst = self.state.rollback(reason, time.time())
        self.store.save(self.state)
        self._trial = None
        self._event(
            "rolled_back",
            reason=reason,
            detail=detail,
            info=t.info,
            target=inst.target,
            slot=inst.slot,
            model=t.model.ref,
            windows=windows,
        )
        log.warning("rolled back %s %s: %s", t.info.model, t.info.version, detail)

    # -- reporting -------------------------------------------------------------------------------
    def _rejected(
        self,
        r: UpdateRejected,
        path: str,
        info: ReleaseInfo | None,
        sha: str | None,
        remember: str | None,
        *,
        always: bool,
    ) -> None:
        """Report a refusal; a permanent one is remembered under ``remember`` (the archive's sha256, or
        the metadata's key when the metadata was what was wrong)."""
        st = self.state
        if st.staging is not None and (sha is None or st.staging.target_sha256 == sha) and r.permanent:
            st.drop_staging()
        if r.permanent and remember is not None:
            st.reject(remember, info.release if info else 0, r.reason, time.time())
        self.store.save(st)
        key = (r.reason, sha or r.detail)
        if not always and key in self._reported:
            return
        self._reported.add(key)
        self._event("rejected", reason=r.reason, detail=r.detail, info=info, target=path)
        log.warning("update rejected (%s): %s", r.reason, r.detail)

    def _announce_boot(self) -> None:
        b = self.boot
        parts = [f"{b.installed.slot}: {b.installed.model} {b.installed.version}"]
        if b.fallbacks:
            parts.append("fell back: " + "; ".join(b.fallbacks))
        reason = "fallback" if b.fallbacks else None
        self._event(
            "booted",
            reason=reason,
            detail="; ".join(parts),
            slot=b.installed.slot,
            model=b.package.ref(),
            release=b.installed.release,
            version=b.installed.version,
        )
        if b.interrupted is not None:
            i = b.interrupted
            given_up = i.target_sha256 is not None and self.state.is_rejected(i.target_sha256)
            self._event(
                "rolled_back",
                reason="interrupted",
                target=i.target,
                slot=i.slot,
                release=i.release,
                version=i.version,
                detail="the trial never committed (restart or power cut)"
                + ("; given up after repeated interruptions" if given_up else "; it may be tried again"),
            )

    def _event(
        self,
        state: str,
        *,
        info: ReleaseInfo | None = None,
        model: ModelRef | None = None,
        release: int | None = None,
        version: str | None = None,
        **fields: Any,
    ) -> None:
        ev = UpdateEvent(
            fleet=self.identity.fleet,
            device=self.identity.device,
            session=self.identity.session,
            seq=self._seq,
            ts=time.time(),
            state=state,  # type: ignore[arg-type]
            release=info.release if info else release,
            version=info.version if info else version,
            model=model,
            serving=self._host.active.ref,
            max_release=self.state.max_release,
            **fields,
        )
        self._seq += 1
        try:
            self._publish(ev)
        except Exception:  # noqa: BLE001 - reporting must not break the update itself
            log.exception("could not queue update event %s", state)
