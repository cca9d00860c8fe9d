"""One training run, in its own process: original data (+ labelled field samples) -> gated candidate.

The service starts it with ``python -m trainer.fleet.retrain_job SPEC.json`` so a crash, a memory
blow-up or a gate failure can never take the service (or the champion) down. The result is written to
``spec["result"]`` as JSON: ``{"status": "ok" | "gate_failed" | "failed", "package", "failures", ...}``;
exit codes 0, 3 (gate) and 1.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trainer.data.screening import ScreenRules
from trainer.ops.broker import die_with_parent


class RetrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_data: str
    """The original dataset (directory or builtin:NAME)."""
    db_url: str | None = None
    """Where labelled field samples are (None: train on the original data only, e.g. the first model)."""
    field_since: float | None = None
    field_devices: list[str] | None = None
    out: str
    champion: str | None = None
    name: str
    version: str
    min_field_gain: float = Field(default=3.0, ge=0)
    """Points the candidate must gain on the field slice (origin=field) over the champion."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Overrides of :class:`trainer.build.TrainConfig`."""
    screen: ScreenRules = Field(default_factory=ScreenRules)
    """Poisoning defences for the field labels (caps, near-duplicates, outlier labellers)."""
    result: str


def run(spec: RetrainSpec) -> dict[str, Any]:
    from trainer.build import TrainConfig, train_package
    from trainer.data.builtin import load_dataset
    from trainer.errors import GateError
    from trainer.evaluation.gate import GateRules
    from trainer.fleet.labelling import field_dataset
    from trainer.store import Store

    t0 = time.time()
    data = base = load_dataset(spec.base_data)
    overrides = dict(spec.train)
    gate_rules = dict(overrides.pop("gate", {}))
    out: dict[str, Any] = {"field_samples": 0, "field_devices": {}}
    if spec.db_url is not None:
        with Store(spec.db_url, create=False) as store:
            field = field_dataset(
                store,
                base.labels,
                since=spec.field_since,
                devices=set(spec.field_devices) if spec.field_devices else None,
                base_size=len(base.samples),
                rules=spec.screen,
            )
        data = base.combine(field.dataset)
        gate_rules["min_slice_gain"] = {"origin=field": spec.min_field_gain}
        out = {
            "field_samples": len(field.dataset.samples),
            "field_devices": field.devices,
            "screening": field.screen.summary(),
            "held_for_review": {str(k): v for k, v in sorted(field.screen.review.items())},
        }
    cfg = TrainConfig.model_validate(
        {
            **overrides,
            "name": spec.name,
            "version": spec.version,
            "gate": GateRules.model_validate(gate_rules),
        }
    )
    try:
        result = train_package(data, spec.out, cfg, champion=spec.champion)
    except GateError as exc:
        return {**out, "status": "gate_failed", "failures": list(exc.failures), "seconds": time.time() - t0}
    except Exception as exc:  # noqa: BLE001 - a failed run, but what the screen held still needs a person
        return {**out, **_failure(exc), "seconds": time.time() - t0}
    ev = result.evaluation
    return {
        **out,
        "status": "ok",
        "package": str(result.package.root),
        "sha256": result.package.sha256,
        "heldout_accuracy": ev.heldout_accuracy.get(ev.device_artifact),
        "gate": ev.gate.model_dump(mode="json"),
        "seconds": time.time() - t0,
    }


def _failure(exc: Exception) -> dict[str, Any]:
    """A failed run's result: the error and the end of its traceback (call inside the except block)."""
    return {
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc()[-4000:],
    }


def start_job(spec: RetrainSpec, work: Path) -> subprocess.Popen[bytes]:
    """Start the run in a child process logging to ``work/train.log``; the result lands in ``spec.result``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(spec.model_dump_json(indent=1))
    log_file = open(work / "train.log", "wb")  # noqa: SIM115 - inherited by the child process
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer.fleet.retrain_job", str(work / "spec.json")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    finally:
        log_file.close()


def read_result(spec: RetrainSpec, returncode: int | None) -> dict[str, Any]:
    """The run's result, or a failure naming the log when it left none."""
    path = Path(spec.result)
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {
            "status": "failed",
            "error": f"no result (exit code {returncode}); see {path.parent / 'train.log'}",
        }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    path = Path((argv or sys.argv[1:])[0])
    spec = RetrainSpec.model_validate_json(path.read_text())
    try:
        res = run(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the service as a failed run
        res = _failure(exc)
    Path(spec.result).write_text(json.dumps(res, indent=1, default=str))
    return {"ok": 0, "gate_failed": 3}.get(res["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
