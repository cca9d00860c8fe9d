"""The agent's small persistent state: session counter and cached choices, written crash-safely
(see :mod:`edge_agent.files`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.files import read_json, write_json_atomic


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
