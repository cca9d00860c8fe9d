"""Why an update did not happen: a reason code for the ``update`` topic, and whether to never retry it."""

from __future__ import annotations

from edge_agent.errors import EdgeFleetError


class UpdateRejected(EdgeFleetError):
    """A release was refused; the current model keeps running.

    ``reason`` is a stable code published on the ``update`` topic (see docs/updates.md for the list);
    ``permanent`` releases are never tried again, while transient ones (network, tampering in transit)
    may succeed on a later attempt. What is remembered is what was wrong: the archive (by its hash: a
    broken model stays broken) or, with ``about_metadata``, the signed metadata that made it unfit for
    this device (wrong fleet, channel, cohort, agent version, hardware), so a corrected release of the
    same archive is tried again.
    """

    def __init__(
        self, reason: str, detail: str, *, permanent: bool = False, about_metadata: bool = False
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.permanent = permanent
        self.about_metadata = about_metadata


class Unreachable(EdgeFleetError):
    """The repository could not be reached (network): retried on the next hint or poll, not reported."""
