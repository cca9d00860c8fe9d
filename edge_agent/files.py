"""Crash-safe file writes, the one way both programs write a file that must never be torn.

A write goes to a temp file beside the target, is fsynced, renamed over the target and the directory
is fsynced, so a power cut at any instant leaves either the old or the new content.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably (``mode``: the new file's permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # the umask may have narrowed or the file existed
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any, *, indent: int = 1, sort_keys: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON atomically and durably."""
    write_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys))


def fsync_file(path: Path) -> None:
    """Flush a file written by someone else (an archive, a download) to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path, default: Any = None) -> Any:
    """Parsed JSON, or ``default`` if the file is missing or unreadable (a torn write is treated as absent)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return default
