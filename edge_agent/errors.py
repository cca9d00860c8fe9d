"""Exceptions the agent raises for bad input: each names what is wrong and where."""

from __future__ import annotations


class EdgeFleetError(Exception):
    """Base class for errors that are reported to the user as one clear line."""


class ConfigError(EdgeFleetError):
    """A configuration file or flag is invalid; the message names the file and the field."""


class PackageError(EdgeFleetError):
    """A model package is missing, corrupt or inconsistent; the message names the path and the check."""


class SourceError(EdgeFleetError):
    """A frame source URI cannot be parsed or opened."""


class BackendError(EdgeFleetError):
    """A runtime cannot load or run an artifact."""
