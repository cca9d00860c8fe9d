"""Signed model releases: a TUF repository of model packages, its HTTP server, signing keys and MQTT hints (see docs/updates.md)."""

from trainer.errors import KeyStoreError, ReleaseError
from trainer.release.hints import mqtt_settings, send_hint
from trainer.release.repository import Expiry, ReleaseRecord, ReleaseRepository
from trainer.release.server import ReleaseServer, main

__all__ = [
    "Expiry",
    "KeyStoreError",
    "main",
    "mqtt_settings",
    "ReleaseError",
    "ReleaseRecord",
    "ReleaseRepository",
    "ReleaseServer",
    "send_hint",
]
