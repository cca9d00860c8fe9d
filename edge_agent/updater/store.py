"""Where the updater keeps things on the device, and crash-safe reads and writes of its state.

Layout under ``{state_dir}/update/``::

    state.json          UpdateStateData, replaced atomically (temp file, fsync, rename, fsync dir)
    slots/a, slots/b    unpacked packages (the factory package stays where the config says)
    downloads/          {target sha256}.tar.part: resumable partial downloads
    tuf/                python-tuf's metadata cache (trusted root history, newest verified metadata)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pydantic import ValidationError

from edge_agent.files import fsync_dir, write_json_atomic
from edge_agent.updater.state import SlotName, UpdateStateData

log = logging.getLogger(__name__)


class UpdateStore:
    """The updater's files under one directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "state.json"
        self.slots = self.root / "slots"
        self.downloads = self.root / "downloads"
        self.tuf = self.root / "tuf"
        self.load_error: str | None = None

    def slot_dir(self, slot: SlotName) -> Path:
        if slot == "factory":
            raise ValueError("the factory package lives where the config says")
        return self.slots / slot

    def load(self) -> UpdateStateData:
        """The persisted state; a fresh one if there is none (or it is unreadable, noted in ``load_error``)."""
        self.load_error = None
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return UpdateStateData()
        try:
            return UpdateStateData.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
            self.load_error = (
                f"{self.state_path}: unreadable ({type(exc).__name__}); starting from the factory model"
            )
            log.error(self.load_error)
            return UpdateStateData()

    def save(self, state: UpdateStateData) -> None:
        write_json_atomic(self.state_path, state.model_dump(mode="json"))

    def clear_slot(self, slot: SlotName) -> Path:
        """Empty a writable slot directory (durably) and return its path (not created)."""
        d = self.slot_dir(slot)
        if d.exists():
            shutil.rmtree(d)
        self.slots.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.slots)
        return d

    def partial(self, target_sha256: str) -> Path:
        """The partial-download file of one target; partial files of other targets are deleted."""
        self.downloads.mkdir(parents=True, exist_ok=True)
        name = f"{target_sha256}.tar.part"
        for p in self.downloads.iterdir():
            if p.name != name:
                p.unlink(missing_ok=True)
        return self.downloads / name
