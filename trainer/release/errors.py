"""Errors of the release repository: each is reported as one clear line by the CLI."""

from __future__ import annotations

from edge_agent.errors import EdgeFleetError


class ReleaseError(EdgeFleetError):
    """A release operation cannot be done (missing release, unknown channel, threshold not met, ...)."""


class KeyStoreError(ReleaseError):
    """A signing key is missing, unreadable or too widely readable."""
