"""The trainer's errors: every one a user can see derives from :class:`EdgeFleetError`.

Each message says what is wrong and where (a file, a line, a field, a URL); the ``edgefleet`` CLI
prints it as one line and exits 2. Errors that also derive from a builtin (``ValueError``,
``RuntimeError``) keep working for callers that catch the builtin.
"""

from __future__ import annotations

from edge_agent.errors import ConfigError, EdgeFleetError
from edge_agent.package_evaluation import Evaluation

__all__ = [
    "ConfigError",
    "DataError",
    "EdgeFleetError",
    "ExportError",
    "GateError",
    "KeyStoreError",
    "LabelImportError",
    "LabelMismatchError",
    "ReleaseError",
    "RolloutDecided",
    "SchemaOutdated",
    "StoreError",
    "UnknownDeviceError",
]


class DataError(EdgeFleetError):
    """A dataset cannot be used as given (empty class, one class, too small to split, bad manifest)."""


class LabelMismatchError(DataError):
    """The candidate's label set differs from the champion's, so the two cannot be compared."""


class LabelImportError(DataError, ValueError):
    """A labels CSV row is invalid; the message names the file, the line and the problem."""


class GateError(EdgeFleetError):
    """The candidate failed the release gate; ``failures`` names every rule that failed."""

    def __init__(self, failures: list[str], evaluation: Evaluation | None = None) -> None:
        self.failures = failures
        self.evaluation = evaluation
        """The candidate's full evaluation (the fleet loop logs why a retrained model was rejected)."""
        super().__init__("gate failed: " + "; ".join(failures))


class ExportError(EdgeFleetError, RuntimeError):
    """Export failed; nothing was written to the output directory."""


class ReleaseError(EdgeFleetError):
    """A release operation cannot be done (missing release, unknown channel, threshold not met, ...)."""


class KeyStoreError(ReleaseError):
    """A signing key is missing, unreadable or too widely readable."""


class StoreError(EdgeFleetError, ValueError):
    """The trainer's database cannot be opened as given (unsupported URL, missing directory or file)."""


class SchemaOutdated(StoreError):
    """The database's schema is older than this release's: ``edgefleet db upgrade`` migrates it (nothing
    upgrades a deployed database on its own)."""

    def __init__(self, url: str, current: str, head: str) -> None:
        self.url = url
        self.current = current
        self.head = head
        super().__init__(
            f"{url}: the database schema is at revision {current}, this release needs {head}: "
            f"run `edgefleet db upgrade --db {url}`"
        )


class UnknownDeviceError(EdgeFleetError, LookupError):
    """A command names a device its fleet does not have (the message names both)."""


class RolloutDecided(EdgeFleetError):
    """A rollout was promoted or aborted by someone else first: one decision per rollout."""
