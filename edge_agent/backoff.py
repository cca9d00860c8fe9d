"""Exponential backoff with jitter, so a fleet does not reconnect in lockstep after an outage."""

from __future__ import annotations

import random


class Backoff:
    """Delays min, 2*min, 4*min ... capped at max, each drawn from [delay/2, delay] ("equal jitter")."""

    def __init__(
        self, minimum: float, maximum: float, factor: float = 2.0, rng: random.Random | None = None
    ) -> None:
        if minimum <= 0 or maximum < minimum or factor < 1:
            raise ValueError(f"bad backoff parameters: min={minimum} max={maximum} factor={factor}")
        self.minimum = minimum
        self.maximum = maximum
        self.factor = factor
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt."""
        delay = min(self.maximum, self.minimum * self.factor**self.attempt)
        self.attempt += 1
        return delay / 2 + self._rng.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0
