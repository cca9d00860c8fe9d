"""Trainer errors for bad input: each message says what is wrong and what to do about it."""

from __future__ import annotations

from typing import Any

from edge_agent.errors import EdgeFleetError


class DataError(EdgeFleetError):
    """A dataset cannot be used as given (empty class, one class, too small to split, bad manifest)."""


class LabelMismatchError(DataError):
    """The candidate's label set differs from the champion's, so the two cannot be compared."""


class GateError(EdgeFleetError):
    """The candidate failed the release gate; ``failures`` names every rule that failed."""

    def __init__(self, failures: list[str], evaluation: dict[str, Any] | None = None) -> None:
        self.failures = failures
        self.evaluation = evaluation
        """The candidate's full evaluation (the fleet loop logs why a retrained model was rejected)."""
        super().__init__("gate failed: " + "; ".join(failures))
