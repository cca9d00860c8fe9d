"""The release archive: a model package as one deterministic, uncompressed tar (the TUF target file).

One file per release makes the TUF length and hashes cover the whole package at once, and a partial
download can be resumed with one HTTP range request. :func:`pack_package` is deterministic (sorted
names, zero mtimes and owners), so the same package always has the same target hash: a roll-forward
to an old release re-publishes byte-identical artifacts. :func:`unpack_archive` accepts only regular
files with plain relative names (no links, devices, absolute paths or ``..``), within count and size
limits, and fsyncs what it writes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path, PurePosixPath

from edge_agent.errors import EdgeFleetError
from edge_agent.files import fsync_dir, fsync_file
from edge_agent.package import MANIFEST

MAX_FILES = 256


class ArchiveError(EdgeFleetError, ValueError):
    """The archive is malformed or unsafe to unpack."""


def package_files(package_dir: Path) -> list[str]:
    """model.json and every file it lists, in archive order."""
    manifest = json.loads((package_dir / MANIFEST).read_text())
    return [MANIFEST, *sorted(manifest.get("files", {}))]


def pack_package(package_dir: str | Path, out: str | Path) -> Path:
    """Write ``package_dir`` (model.json and the files it lists) as a deterministic tar at ``out``."""
    src, out = Path(package_dir), Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in package_files(src):
            data = (src / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    fsync_file(tmp)
    os.replace(tmp, out)
    return out


def _safe_name(name: str) -> PurePosixPath:
    """The member's path if it is plain, relative and written in exactly one way (no ``//``, ``./`` or
    trailing ``/``: two spellings of one file would otherwise both pass the duplicate check)."""
    p = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or p.is_absolute()
        or p.as_posix() != name
        or any(part in ("", ".", "..") for part in p.parts)
    ):
        raise ArchiveError(f"unsafe member name {name!r}")
    return p


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """Write one regular member to ``target`` (a new file), fsynced; a path that clashes with what is
    already there (a file, then a child of it) is an ArchiveError, not an OSError."""
    src = tar.extractfile(member)
    assert src is not None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as f:
            while block := src.read(1 << 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise ArchiveError(f"member {member.name!r} clashes with another member: {exc.strerror}") from None


def unpack_archive(
    archive: str | Path, dest: str | Path, *, max_bytes: int, max_files: int = MAX_FILES
) -> list[str]:
    """Extract ``archive`` into the new directory ``dest``; every file is fsynced. Returns the names."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    names: list[str] = []
    total = 0
    try:
        tar = tarfile.open(archive, mode="r:")  # noqa: SIM115 - closed by the with-block below
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"not a tar archive: {exc}") from None
    with tar:
        try:
            for m in tar:
                if m.isdir():
                    _safe_name(m.name)
                    continue
                if not m.isreg():
                    raise ArchiveError(f"member {m.name!r} is not a regular file")
                rel = _safe_name(m.name)
                if m.name in names:
                    raise ArchiveError(f"duplicate member {m.name!r}")
                names.append(m.name)
                total += m.size
                if len(names) > max_files:
                    raise ArchiveError(f"more than {max_files} files")
                if total > max_bytes:
                    raise ArchiveError(f"unpacked size exceeds {max_bytes} bytes")
                _write_member(tar, m, dest.joinpath(*rel.parts))
        except tarfile.TarError as exc:
            raise ArchiveError(f"corrupt tar archive: {exc}") from None
    for d in sorted({p.parent for p in dest.rglob("*")} | {dest}, key=lambda p: -len(p.parts)):
        fsync_dir(d)
    if MANIFEST not in names:
        raise ArchiveError(f"archive has no {MANIFEST}")
    return names
