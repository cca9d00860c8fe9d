"""Which model to start with: the committed slot, else the previous one, else the factory package.

Runs before anything else at agent start. A trial that never committed (power cut, crash) is
abandoned; every candidate is verified (each file's sha256 against model.json, and model.json's own
hash against what the updater recorded) before it is chosen, and a fallback is recorded in the state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.errors import PackageError
from edge_agent.package import ModelPackage, load_package
from edge_agent.updater.state import Installed, UpdateStateData
from edge_agent.updater.store import UpdateStore


@dataclass
class Boot:
    """The verified package to start with and how it was chosen."""

    package: ModelPackage
    installed: Installed
    state: UpdateStateData
    interrupted: Installed | None = None
    """A trial that was running when the agent last stopped (now abandoned)."""
    fallbacks: list[str] = field(default_factory=list)
    """Candidates that failed verification, with why."""


def _factory(path: Path) -> tuple[ModelPackage, Installed]:
    pkg = load_package(path)
    m = pkg.manifest
    return pkg, Installed(slot="factory", package_sha256=pkg.sha256, model=m.name, version=m.version)


def select_boot(
    store: UpdateStore, factory_path: Path, *, max_attempts: int = 2, now: float | None = None
) -> Boot:
    """Choose, verify and persist the model to boot; raises PackageError if not even the factory one verifies."""
    now = time.time() if now is None else now
    state = store.load()
    fallbacks = [store.load_error] if store.load_error else []
    interrupted = state.abandon_interrupted(max_attempts, now)
    chosen: tuple[ModelPackage, Installed] | None = None
    for cand in state.boot_order():
        if cand.slot == "factory":
            continue  # verified below, from the config path
        try:
            pkg = load_package(store.slot_dir(cand.slot))
            if pkg.sha256 != cand.package_sha256:
                raise PackageError(
                    f"model.json sha256 {pkg.sha256[:12]}... is not the recorded {cand.package_sha256[:12]}..."
                )
            chosen = (pkg, cand)
            break
        except PackageError as exc:
            fallbacks.append(f"slot {cand.slot}: {exc}")
    if chosen is None:
        pkg, factory = _factory(factory_path)
        if state.committed is not None and state.committed.slot == "factory":
            factory.release = state.committed.release
        chosen = (pkg, factory)
    pkg, inst = chosen
    if state.committed is None or state.committed.slot != inst.slot or inst.slot == "factory":
        if state.previous is not None and state.previous.slot == inst.slot:
            state.previous = None  # the fallback is now the committed model
        state.committed = inst
    if state.staging is not None and state.staging.slot == inst.slot:
        state.staging = None
    store.save(state)
    return Boot(package=pkg, installed=inst, state=state, interrupted=interrupted, fallbacks=fallbacks)
