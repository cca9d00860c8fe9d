"""Signed model releases: a TUF repository of model packages, its HTTP server, hints and tooling.

:mod:`.repository` (python-tuf Metadata API: roles, keys, channels, release counter, promotion,
roll-forward, key rotation), :mod:`.keys` (private keys behind signer URIs), :mod:`.server` (HTTP with
ranges and scheduled re-signing), :mod:`.hints` (the retained MQTT hint), :mod:`.cli` (``edgefleet
release``) and :mod:`.tiny` (tiny real packages for tests and benchmarks). See docs/updates.md.
"""
