"""The agent's small persistent state: session counter and cached choices, written crash-safely.

Every write goes to a temp file, is fsynced, renamed over the old file and the directory fsynced, so a
power cut at any instant leaves either the old or the new content, never a torn file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
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


class AgentState:
    """Files under the agent's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def spool_path(self) -> Path:
        return self.root / "spool.sqlite"

    def next_session(self) -> int:
        """Increment and return the session counter (one per agent start; part of the dedupe key)."""
        path = self.root / "session.json"
        session = int((read_json(path) or {}).get("session", 0)) + 1
        write_json_atomic(path, {"session": session})
        return session

    def cached_choice(self, key: str) -> dict[str, Any] | None:
        choices = read_json(self.root / "backend-choice.json") or {}
        value = choices.get(key)
        return value if isinstance(value, dict) else None

    def store_choice(self, key: str, choice: dict[str, Any]) -> None:
        path = self.root / "backend-choice.json"
        choices = read_json(path) or {}
        choices[key] = choice
        write_json_atomic(path, choices)
