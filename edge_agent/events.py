"""A thread-safe tally of incidents (reconnects, evictions, bad messages) reported once per window."""

from __future__ import annotations

import threading
from collections import Counter


class EventCounter:
    """Components ``add`` incidents from any thread; the agent ``take``s them into each window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._totals: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._counts[name] += n
                self._totals[name] += n

    def take(self) -> dict[str, int]:
        """Counts since the previous ``take`` (and reset them)."""
        with self._lock:
            out = dict(self._counts)
            self._counts.clear()
            return out

    def totals(self) -> dict[str, int]:
        """Counts since start (for status and tests)."""
        with self._lock:
            return dict(self._totals)
