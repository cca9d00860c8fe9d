"""The device's view of the release repository: python-tuf's ngclient with the root pinned at provisioning.

Every check builds a fresh ngclient ``Updater`` (python-tuf refreshes once per instance), bootstrapped
from the pinned root file; newer roots are only accepted when signed by the threshold of the trusted
root *and* of the new root (python-tuf walks the chain). The local metadata cache keeps the newest
verified versions, so replayed (older) metadata is refused. TUF failures are mapped to the reason
codes the updater publishes; network failures become :class:`Unreachable`.

    repo = ReleaseRepositoryClient("http://trainer:8080", Path("/etc/edgefleet/root.json"), Path("tuf"))
    info = repo.targetinfo("stable/shop/colour.tar")      # verified TargetFile or None
    repo.download(info, Path("downloads/x.tar.part"))     # resumable, length-capped, hash-checked
"""

from __future__ import annotations

import json
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from edge_agent.updater.errors import Unreachable, UpdateRejected
from edge_agent.updater.fetcher import HttpFetcher


def trusted_root_version(cache_dir: Path, pinned: bytes) -> int:
    """Version of the newest verified root in a device's TUF cache (the pinned root's if none)."""
    try:
        return int(json.loads((Path(cache_dir) / "root.json").read_bytes())["signed"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(json.loads(pinned)["signed"]["version"])


def classify(exc: Exception) -> Exception:
    """A TUF or download exception as :class:`UpdateRejected` (with a reason code) or :class:`Unreachable`."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return UpdateRejected("endless_data", detail)
    if isinstance(exc, tuf_exc.DownloadError):  # HTTP errors, timeouts, refused connections
        return Unreachable(detail)
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return UpdateRejected("expired_metadata", detail)
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return UpdateRejected("bad_signature", detail)
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        return UpdateRejected("metadata_version", detail)
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return UpdateRejected("metadata_mismatch", detail)
    if isinstance(exc, tuf_exc.RepositoryError):
        return UpdateRejected("metadata_invalid", detail)
    return exc


class ReleaseRepositoryClient:
    """Verified target lookups and downloads against one repository URL."""

    def __init__(
        self, url: str, root: Path, cache_dir: Path, *, timeout_s: float = 30.0, deadline_s: float = 600.0
    ) -> None:
        base = url.rstrip("/")
        self.metadata_url = f"{base}/metadata/"
        self.targets_url = f"{base}/targets/"
        self.root_bytes = Path(root).read_bytes()
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self._fetcher: HttpFetcher | None = None
        self._updater: Updater | None = None
        self.requests = 0

    def targetinfo(self, path: str) -> TargetFile | None:
        """Refresh all top-level metadata and return the verified info of target ``path`` (None: no such target)."""
        self.close()
        self._fetcher = HttpFetcher(self.timeout_s, self.deadline_s)
        try:
            self._updater = Updater(
                str(self.cache_dir),
                self.metadata_url,
                target_base_url=self.targets_url,
                fetcher=self._fetcher,
                config=UpdaterConfig(max_root_rotations=32, max_delegations=8),
                bootstrap=self.root_bytes,
            )
            self._updater.refresh()
            return self._updater.get_targetinfo(path)
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            raise classify(exc) from exc

    def trusted_root_version(self) -> int:
        """Version of the newest root this device trusts (from its metadata cache, else the pinned root)."""
        return trusted_root_version(self.cache_dir, self.root_bytes)

    def target_url(self, info: TargetFile) -> str:
        """Consistent-snapshot URL of a target: ``{dir}/{sha256}.{name}``."""
        directory, sep, name = info.path.rpartition("/")
        return f"{self.targets_url}{directory}{sep}{info.hashes['sha256']}.{name}"

    def download(self, info: TargetFile, part: Path) -> int:
        """Fetch the target into ``part`` (resuming it) and check length and hashes; returns the resume offset.

        A hash mismatch after a resumed transfer is retried once from zero (the old prefix may be stale);
        a mismatch on a whole transfer is ``artifact_mismatch``.
        """
        assert self._fetcher is not None, "targetinfo() first"
        url = self.target_url(info)
        for attempt in range(2):
            try:
                resumed = self._fetcher.download_resumable(url, part, info.length)
            except tuf_exc.DownloadError as exc:
                raise classify(exc) from exc
            try:
                with open(part, "rb") as f:
                    info.verify_length_and_hashes(f)
                return resumed
            except tuf_exc.LengthOrHashMismatchError as exc:
                part.unlink(missing_ok=True)
                if resumed == 0 or attempt:
                    raise UpdateRejected("artifact_mismatch", f"{info.path}: {exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._fetcher is not None:
            self.requests += self._fetcher.requests
            self._fetcher.close()
            self._fetcher = None
