"""The release repository: model packages as TUF targets, signed with python-tuf's Metadata API.

Layout of a repository directory (serve ``metadata/`` and ``targets/`` from any static host)::

    metadata/1.root.json ...        every root version (clients walk the chain on rotation)
    metadata/N.targets.json         top-level targets: delegates channel roles, signed offline
    metadata/N.canary.json          channel roles: the releases, signed by each channel's own key
    metadata/N.stable.json
    metadata/N.snapshot.json        versions of all targets metadata (online key)
    metadata/timestamp.json         the newest snapshot, short expiry, re-signed on a schedule (online key)
    targets/{channel}/{fleet}/{sha256}.{model}.tar    package archives (consistent snapshots)
    releases.json                   the release ledger (history for status, promotion and roll-forward)
    signers.json, keys/             private-key URIs and the online key files (0600; keys/ is 0700)

Roles and keys: root has a threshold of offline keys; the top-level targets key is offline too and
only signs delegations; each channel (``canary``, ``stable``) is a delegated role with its own key and
the path pattern ``{channel}/*/*``, so a leaked canary key cannot publish to stable. Snapshot and
timestamp keys are online. Every publish, promotion and roll-forward takes the next value of one
repository-wide release counter, which devices require to increase.

    repo = ReleaseRepository.init("build/repo")                   # keys, root v1, empty channels
    rec = repo.publish("build/models/v2", channel="canary", fleet="shop")
    repo.promote("shop", rec.model)                                # canary -> stable, new counter
    repo.rollback("shop", rec.model, "canary")                     # roll-forward to the previous artifact
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.repository import Repository

from edge_agent.files import fsync_dir, write_atomic, write_json_atomic
from edge_agent.package import MANIFEST, ModelManifest, load_package, sha256_file
from edge_agent.protocol import ReleaseHint
from edge_agent.updater.archive import pack_package
from edge_agent.updater.cohort import Cohort
from edge_agent.updater.release_info import CUSTOM_KEY, ReleaseInfo, preprocess_text, target_path
from trainer.errors import ReleaseError
from trainer.release.keys import KeyStore

CHANNELS = ("canary", "stable")
TOP_LEVEL = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
_SIGNED = {Root.type: Root, Targets.type: Targets, Snapshot.type: Snapshot, Timestamp.type: Timestamp}
_VERSIONED = re.compile(r"^(\d+)\.([A-Za-z0-9_.\-]+)\.json$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after signing."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=365)
    channel: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        return getattr(self, role) if role in TOP_LEVEL else self.channel

    def to_json(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name).total_seconds() for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, float]) -> Expiry:
        return cls(**{k: timedelta(seconds=v) for k, v in data.items() if k in {f.name for f in fields(cls)}})


class ReleaseRecord(BaseModel):
    """One entry of the release ledger: a target as signed into a channel."""

    model_config = ConfigDict(extra="forbid")
    release: int
    channel: str
    fleet: str
    model: str
    version: str
    target: str
    sha256: str
    length: int
    package_sha256: str
    action: Literal["release", "promote", "rollback"] = "release"
    source_release: int | None = None
    min_agent_version: str = "0"
    hardware: list[str] = []
    published: int
    cohort: Cohort | None = None
    """Canary releases: the share of the fleet (stable hash of device ids) that takes it."""

    def hint(self, repository_url: str | None = None) -> ReleaseHint:
        """The retained MQTT hint announcing this release on ``release/{channel}``."""
        return ReleaseHint(
            fleet=self.fleet,
            channel=self.channel,
            model=self.model,
            version=self.version,
            release=self.release,
            target=self.target,
            sha256=self.sha256,
            length=self.length,
            package_sha256=self.package_sha256,
            repository=repository_url,
            action=self.action,
            ts=self.published,
        )


def _now() -> datetime:
    return datetime.now(timezone.utc)


class ReleaseRepository(Repository):
    """A TUF repository on disk holding model releases (see the module docstring)."""

    def __init__(self, path: str | Path, *, expiry: Expiry | None = None) -> None:
        self.path = Path(path)
        self.metadata_dir = self.path / "metadata"
        self.targets_dir = self.path / "targets"
        self.ledger_path = self.path / "releases.json"
        config_path = self.path / "repository.json"
        if not config_path.exists():
            raise ReleaseError(f"{self.path}: not a release repository (run `edgefleet release init`)")
        self.config = json.loads(config_path.read_text())
        self.expiry = expiry or Expiry.from_json(self.config.get("expiry", {}))
        self.channels: tuple[str, ...] = tuple(self.config.get("channels", CHANNELS))
        self.keys = KeyStore(self.path / "signers.json", self.path / "keys")
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._lock_file: Any = None

    # -- creation ----------------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        path: str | Path,
        *,
        root_keys: int = 3,
        root_threshold: int = 2,
        offline_keys: str | Path | None = None,
        channels: tuple[str, ...] = CHANNELS,
        expiry: Expiry | None = None,
        url: str | None = None,
    ) -> ReleaseRepository:
        """Create keys and the first version of every role in a new directory ``path``."""
        p = Path(path)
        if (p / "repository.json").exists():
            raise ReleaseError(f"{p}: a release repository already exists here")
        if not 1 <= root_threshold <= root_keys:
            raise ReleaseError(f"root threshold {root_threshold} must be between 1 and {root_keys} keys")
        for ch in channels:
            if ch in TOP_LEVEL or not re.match(r"^[a-z][a-z0-9-]{0,31}$", ch):
                raise ReleaseError(f"invalid channel name {ch!r}")
        (p / "metadata").mkdir(parents=True, exist_ok=True)
        (p / "targets").mkdir(exist_ok=True)
        (p / "keys").mkdir(mode=0o700, exist_ok=True)
        exp = expiry or Expiry()
        offline = Path(offline_keys).resolve() if offline_keys else (p / "keys").resolve()
        config = {
            "format": "edgefleet.release-repo/1",
            "channels": list(channels),
            "expiry": exp.to_json(),
            "url": url,
            "offline_keys": str(offline),
        }
        write_json_atomic(p / "repository.json", config)
        repo = cls(p)
        with repo._locked():
            with repo.edit_root() as root:
                for _ in range(root_keys):
                    root.add_key(repo.keys.generate("root", offline), Root.type)
                root.roles[Root.type].threshold = root_threshold
                root.add_key(repo.keys.generate("targets", offline), Targets.type)
                root.add_key(repo.keys.generate("snapshot"), Snapshot.type)
                root.add_key(repo.keys.generate("timestamp"), Timestamp.type)
            with repo.edit_targets() as targets:
                targets.delegations = Delegations(keys={}, roles={})
                for ch in channels:
                    assert targets.delegations.roles is not None
                    targets.delegations.roles[ch] = DelegatedRole(ch, [], 1, True, paths=[f"{ch}/*/*"])
                    targets.add_key(repo.keys.generate(ch), ch)
            for ch in channels:
                with repo.edit_targets(ch):
                    pass
            quiet = logging.getLogger("tuf.api._payload")  # it logs "No signature" for the empty v0 skeletons
            level = quiet.level
            quiet.setLevel(logging.WARNING)
            try:
                repo.do_snapshot()
                repo.do_timestamp()
            finally:
                quiet.setLevel(level)
        return repo

    # -- python-tuf Repository interface -----------------------------------------------------------
    def _versions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.metadata_dir.iterdir():
            m = _VERSIONED.match(f.name)
            if m:
                out[m.group(2)] = max(out.get(m.group(2), 0), int(m.group(1)))
        return out

    def metadata_path(self, role: str, version: int | None = None) -> Path:
        """File of ``role``'s newest (or given) version."""
        if role == Timestamp.type:
            return self.metadata_dir / "timestamp.json"
        v = version or self._versions().get(role)
        if v is None:
            raise ReleaseError(f"no metadata for role {role!r}")
        return self.metadata_dir / f"{v}.{role}.json"

    def open(self, role: str) -> Metadata:
        """Newest metadata of ``role`` from disk, or a version-0 skeleton for a new role."""
        try:
            path = self.metadata_path(role)
            return Metadata.from_bytes(path.read_bytes())
        except (ReleaseError, FileNotFoundError):
            md: Metadata = Metadata(_SIGNED.get(role, Targets)())
            md.signed.version = 0
            return md

    def close(self, role: str, md: Metadata) -> None:
        """Bump version and expiry, sign with every available key of the role, check the threshold, write."""
        md.signed.version += 1
        md.signed.expires = _now() + self.expiry.of(role)
        md.signatures.clear()
        previous_root = self.open(Root.type).signed if role == Root.type else None
        for signer in self._signers(
            role, md, previous_root if isinstance(previous_root, Root) and previous_root.version else None
        ):
            md.sign(signer, append=True)
        self._check_threshold(role, md)
        self.write_metadata(role, md)

    def write_metadata(self, role: str, md: Metadata) -> Path:
        """Write one metadata version atomically (no checks: also used to stage attacks in tests)."""
        path = (
            self.metadata_dir / "timestamp.json"
            if role == Timestamp.type
            else self.metadata_dir / f"{md.signed.version}.{role}.json"
        )
        write_atomic(path, md.to_bytes())
        return path

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        v = self._versions()
        return {f"{r}.json": MetaFile(v[r]) for r in (Targets.type, *self.channels) if r in v}

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(self._versions().get(Snapshot.type, 1))

    # -- signing -----------------------------------------------------------------------------------
    def _role_keys(self, role: str) -> tuple[list[str], dict[str, Key], int]:
        """Key ids, keys and threshold that sign ``role`` according to its delegator."""
        if role in TOP_LEVEL:
            root = self.root()
            r = root.roles[role]
            return list(r.keyids), dict(root.keys), r.threshold
        targets = self.targets()
        if (
            targets.delegations is None
            or targets.delegations.roles is None
            or role not in targets.delegations.roles
        ):
            raise ReleaseError(f"unknown channel {role!r} (channels: {', '.join(self.channels)})")
        d = targets.delegations.roles[role]
        return list(d.keyids), dict(targets.delegations.keys), d.threshold

    def _signers(self, role: str, md: Metadata, previous_root: Root | None) -> Iterator[Signer]:
        if role == Root.type:
            new = md.signed
            assert isinstance(new, Root)
            keyids = list(new.roles[Root.type].keyids)
            keys = dict(new.keys)
            if previous_root is not None:  # a new root must satisfy the old threshold too
                keyids += [k for k in previous_root.roles[Root.type].keyids if k not in keyids]
                keys = {**previous_root.keys, **keys}
        else:
            keyids, keys, _ = self._role_keys(role)
        for keyid in keyids:
            if self.keys.has(keyid):
                yield self.keys.signer(keys[keyid])

    def _check_threshold(self, role: str, md: Metadata) -> None:
        try:
            if role == Root.type:
                new = md.signed
                assert isinstance(new, Root)
                prev = self.open(Root.type).signed
                previous = prev if isinstance(prev, Root) and prev.version else None
                result = new.get_root_verification_result(previous, md.signed_bytes, md.signatures)
                if not result.verified:
                    raise UnsignedMetadataError(
                        f"root v{new.version}: signed by {len(result.first.signed)}/{result.first.threshold} of the "
                        f"trusted root's keys and {len(result.second.signed)}/{result.second.threshold} of its own"
                    )
            elif role in TOP_LEVEL:
                self.root().verify_delegate(role, md.signed_bytes, md.signatures)
            else:
                self.targets().verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError as exc:
            raise ReleaseError(
                f"cannot sign {role}: {exc} (are its keys offline? see signers.json)"
            ) from None

    # -- locking -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize writers across threads and processes (the server re-signs while the CLI publishes)."""
        with self._lock:
            if self._lock_depth == 0:
                self._lock_file = open(self.path / ".lock", "a+")  # noqa: SIM115 - held across the block
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                    self._lock_file.close()
                    self._lock_file = None

    def _commit_snapshot(self) -> None:
        self.do_snapshot()
        self.do_timestamp()

    # -- releases ----------------------------------------------------------------------------------
    def releases(self) -> list[ReleaseRecord]:
        """The ledger, oldest first."""
        try:
            return [ReleaseRecord.model_validate(r) for r in json.loads(self.ledger_path.read_text())]
        except FileNotFoundError:
            return []

    def _signed_releases(self) -> list[ReleaseRecord]:
        """Releases currently in the signed channel metadata (the truth, should the ledger lag)."""
        out = []
        for ch in self.channels:
            for path, tf in self.targets(ch).targets.items():
                info = ReleaseInfo.model_validate((tf.custom or {}).get(CUSTOM_KEY))
                out.append(self._record(info, path, tf.hashes["sha256"], tf.length))
        return out

    def next_release(self) -> int:
        """The next release counter: above every counter in the ledger and in the signed metadata."""
        seen = [r.release for r in self.releases()] + [r.release for r in self._signed_releases()]
        return max(seen, default=0) + 1

    def current(self, channel: str, fleet: str, model: str) -> ReleaseRecord | None:
        """The release a channel currently offers to ``fleet`` for ``model`` (from signed metadata)."""
        self._check_channel(channel)
        path = target_path(channel, fleet, model)
        tf = self.targets(channel).targets.get(path)
        if tf is None:
            return None
        info = ReleaseInfo.model_validate((tf.custom or {}).get(CUSTOM_KEY))
        return self._record(info, path, tf.hashes["sha256"], tf.length)

    @staticmethod
    def _record(info: ReleaseInfo, path: str, sha: str, length: int) -> ReleaseRecord:
        return ReleaseRecord(
            release=info.release,
            channel=info.channel,
            fleet=info.fleet,
            model=info.model,
            version=info.version,
            target=path,
            sha256=sha,
            length=length,
            package_sha256=info.package_sha256,
            action=info.action,
            source_release=info.source_release,
            min_agent_version=info.min_agent_version,
            hardware=info.hardware,
            published=info.published,
            cohort=info.cohort,
        )

    def _check_channel(self, channel: str) -> None:
        if channel not in self.channels:
            raise ReleaseError(f"unknown channel {channel!r} (channels: {', '.join(self.channels)})")

    def blob_path(self, target: str, sha256: str) -> Path:
        """Where a target's bytes live (the consistent-snapshot name ``{dir}/{sha256}.{name}``)."""
        directory, _, name = target.rpartition("/")
        return self.targets_dir / directory / f"{sha256}.{name}"

    def publish(
        self,
        package_dir: str | Path,
        *,
        channel: str,
        fleet: str,
        min_agent_version: str = "0",
        hardware: tuple[str, ...] | list[str] = (),
        release: int | None = None,
        cohort: Cohort | None = None,
    ) -> ReleaseRecord:
        """Sign ``package_dir`` (verified first) into ``channel`` for ``fleet`` under the next release counter.

        ``cohort`` limits a canary release to a share of the fleet (devices with ``channel: auto``);
        ``release`` forces a counter (only for staging downgrade attacks in tests: devices refuse it).
        """
        self._check_channel(channel)
        if cohort is not None and channel == "stable":
            raise ReleaseError("a stable release goes to every device: a cohort belongs to canary releases")
        pkg = load_package(package_dir)
        m = pkg.manifest
        for what, value in (("fleet", fleet), ("model name", m.name)):
            if not _NAME.match(value):
                raise ReleaseError(
                    f"{what} {value!r}: letters, digits, '_', '.', '-' only (it is a target path segment)"
                )
        with self._locked():
            tmp = self.path / "tmp"
            tmp.mkdir(exist_ok=True)
            archive = pack_package(pkg.root, tmp / f"{m.name}.tar")
            sha, length = sha256_file(archive), archive.stat().st_size
            path = target_path(channel, fleet, m.name)
            blob = self.blob_path(path, sha)
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.replace(archive, blob)
            fsync_dir(blob.parent)
            info = ReleaseInfo(
                fleet=fleet,
                channel=channel,
                model=m.name,
                version=m.version,
                release=release if release is not None else self.next_release(),
                package_sha256=pkg.sha256,
                package_format=m.format,
                formats={k: a.runtime for k, a in m.artifacts.items()},
                preprocess=preprocess_text(m.preprocess.model_dump(mode="json")),
                min_agent_version=min_agent_version,
                hardware=list(hardware),
                published=int(time.time()),
                cohort=cohort,
            )
            return self._sign_release(info, path, sha, length)

    def _sign_release(self, info: ReleaseInfo, path: str, sha: str, length: int) -> ReleaseRecord:
        tf = TargetFile(length, {"sha256": sha}, path, {"custom": {CUSTOM_KEY: info.model_dump(mode="json")}})
        with self.edit_targets(info.channel) as targets:
            targets.targets[path] = tf
        self._commit_snapshot()
        record = self._record(info, path, sha, length)
        ledger = [r.model_dump(mode="json") for r in self.releases()] + [record.model_dump(mode="json")]
        write_json_atomic(self.ledger_path, ledger)
        return record

    def _republish(
        self,
        source: ReleaseRecord,
        channel: str,
        action: Literal["promote", "rollback"],
        cohort: Cohort | None = None,
    ) -> ReleaseRecord:
        """Sign ``source``'s artifact into ``channel`` under a new counter (same bytes, same hash)."""
        old_blob = self.blob_path(source.target, source.sha256)
        if not old_blob.exists():
            raise ReleaseError(f"artifact of release {source.release} is gone ({old_blob})")
        path = target_path(channel, source.fleet, source.model)
        blob = self.blob_path(path, source.sha256)
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(old_blob, blob)
            except OSError:
                shutil.copyfile(old_blob, blob)
            fsync_dir(blob.parent)
        m = _archived_manifest(old_blob)
        info = ReleaseInfo(
            fleet=source.fleet,
            channel=channel,
            model=m.name,
            version=m.version,
            release=self.next_release(),
            package_sha256=source.package_sha256,
            package_format=m.format,
            formats={k: a.runtime for k, a in m.artifacts.items()},
            preprocess=preprocess_text(m.preprocess.model_dump(mode="json")),
            min_agent_version=source.min_agent_version,
            hardware=source.hardware,
            action=action,
            source_release=source.release,
            published=int(time.time()),
            cohort=cohort,
        )
        return self._sign_release(info, path, source.sha256, source.length)

    def _find(self, fleet: str, model: str, release: int) -> ReleaseRecord:
        for r in self.releases():
            if r.release == release and r.fleet == fleet and r.model == model:
                return r
        raise ReleaseError(f"no release {release} of {model} for fleet {fleet}")

    def promote(
        self,
        fleet: str,
        model: str,
        *,
        from_channel: str = "canary",
        to_channel: str = "stable",
        release: int | None = None,
    ) -> ReleaseRecord:
        """Offer ``from_channel``'s current release (or release ``release``) on ``to_channel`` under a new counter."""
        self._check_channel(from_channel)
        self._check_channel(to_channel)
        with self._locked():
            source = (
                self._find(fleet, model, release)
                if release is not None
                else self.current(from_channel, fleet, model)
            )
            if source is None:
                raise ReleaseError(f"channel {from_channel} has no release of {model} for fleet {fleet}")
            return self._republish(source, to_channel, "promote")

    def rollback(
        self, fleet: str, model: str, channel: str, *, to_release: int | None = None
    ) -> ReleaseRecord:
        """Roll a channel forward onto an earlier artifact: a new release, with a higher counter, of old bytes.

        Without ``to_release`` the target is the newest earlier release (of any channel) whose package
        differs from the channel's current one.
        """
        self._check_channel(channel)
        with self._locked():
            current = self.current(channel, fleet, model)
            if to_release is not None:
                source = self._find(fleet, model, to_release)
            else:
                if current is None:
                    raise ReleaseError(
                        f"channel {channel} has no release of {model} for fleet {fleet} to roll back"
                    )
                earlier = [
                    r
                    for r in self.releases()
                    if r.fleet == fleet
                    and r.model == model
                    and r.release < current.release
                    and r.package_sha256 != current.package_sha256
                ]
                if not earlier:
                    raise ReleaseError(f"no earlier release of {model} for fleet {fleet} to roll back to")
                source = max(earlier, key=lambda r: r.release)
            # The same cohort rolls back: exactly the devices that took the current canary release.
            return self._republish(source, channel, "rollback", cohort=current.cohort if current else None)

    # -- keys and expiry ---------------------------------------------------------------------------
    def rotate_key(self, role: str) -> list[str]:
        """Replace every key of ``role`` with new ones (same count and threshold); returns the new key ids.

        Root: the new root version is signed by the old *and* the new keys, so devices that trust the
        old root accept it. Top-level roles: a new root (signed by the root keys) names the new key.
        Channels: new delegations in top-level targets (signed by the offline targets key). The role
        is then re-signed with its new key, and the old private keys move to ``retired/``.
        """
        with self._locked():
            if role in TOP_LEVEL:
                old_ids = list(self.root().roles[role].keyids)
            else:
                old_ids, _, _ = self._role_keys(role)
            directory = Path(self.config["offline_keys"]) if role in (Root.type, Targets.type) else None
            new_keys = [self.keys.generate(role, directory) for _ in old_ids]
            try:
                self._name_keys(role, old_ids, new_keys)
            except Exception:
                for k in new_keys:  # the rotation did not happen: forget the unused new keys
                    self.keys.retire(k.keyid)
                raise
            self._resign_rotated(role)
            for kid in old_ids:
                self.keys.retire(kid)
            return [k.keyid for k in new_keys]

    def _name_keys(self, role: str, old_ids: list[str], new_keys: list[Key]) -> None:
        """Name ``new_keys`` instead of ``old_ids`` in the role's delegator (root or top-level targets)."""
        with self._locked():
            if role in TOP_LEVEL:
                with self.edit_root() as root:
                    for k in new_keys:
                        root.add_key(k, role)
                    for kid in old_ids:
                        root.revoke_key(kid, role)
            else:
                with self.edit_targets() as targets:
                    for k in new_keys:
                        targets.add_key(k, role)
                    for kid in old_ids:
                        targets.revoke_key(kid, role)

    def _resign_rotated(self, role: str) -> None:
        """Sign a new version of a role whose keys changed (and the snapshot and timestamp after it)."""
        with self._locked():
            if role == Targets.type or role in self.channels:
                with self.edit_targets(role):
                    pass
            if role == Snapshot.type:
                self.do_snapshot(force=True)
                self.do_timestamp(force=True)
            elif role == Timestamp.type:
                self.do_timestamp(force=True)
            elif role != Root.type:
                self._commit_snapshot()

    def refresh(self, *, force: bool = False) -> list[str]:
        """Re-sign online roles that have used half their lifetime (or all, with ``force``); returns them.

        The trainer's server runs this on a schedule; ``edgefleet release refresh`` does it from cron.
        Channel roles are re-signed too when their keys are available here.
        """
        done = []
        with self._locked():
            now = _now()

            def due(role: str) -> bool:
                return force or self.open(role).signed.expires - now < self.expiry.of(role) / 2

            for ch in self.channels:
                keyids, _, _ = self._role_keys(ch)
                if due(ch) and any(self.keys.has(k) for k in keyids):
                    with self.edit_targets(ch):
                        pass
                    done.append(ch)
            if done or due(Snapshot.type):
                self.do_snapshot(force=True)
                done.append(Snapshot.type)
            if done or due(Timestamp.type):
                self.do_timestamp(force=True)
                done.append(Timestamp.type)
        return done

    # -- inspection --------------------------------------------------------------------------------
    def root_bytes(self) -> bytes:
        """The newest root metadata, to pin on devices at provisioning."""
        return self.metadata_path(Root.type).read_bytes()

    def status(self) -> dict[str, Any]:
        """Roles (version, expiry, keys online), each channel's current releases and the ledger tail."""
        roles = {}
        for role in (*TOP_LEVEL, *self.channels):
            md = self.open(role)
            keyids, _, threshold = self._role_keys(role)
            roles[role] = {
                "version": md.signed.version,
                "expires": md.signed.expires.isoformat(),
                "expires_in_s": round((md.signed.expires - _now()).total_seconds()),
                "threshold": threshold,
                "keys": {
                    k[:12]: ("available here" if self.keys.has(k) else "offline / not here") for k in keyids
                },
            }
        channels = {
            ch: [r.model_dump() for r in self._signed_releases() if r.channel == ch] for ch in self.channels
        }
        return {
            "path": str(self.path),
            "roles": roles,
            "channels": channels,
            "ledger": [r.model_dump() for r in self.releases()[-20:]],
        }


def _archived_manifest(blob: Path) -> ModelManifest:
    """model.json of a release archive (the archive is the truth about an old release's package)."""
    with tarfile.open(blob, mode="r:") as tar:
        f = tar.extractfile(MANIFEST)
        if f is None:
            raise ReleaseError(f"{blob}: no {MANIFEST}")
        return ModelManifest.model_validate_json(f.read())
