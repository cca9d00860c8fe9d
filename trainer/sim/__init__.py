"""Simulation and demo fixtures: telemetry windows, tiny packages, simulated streams and cameras, the demos.

Imported by tests, benches and ``edgefleet demo`` only (the import contract in pyproject.toml checks it)."""

from trainer.sim.demo import DemoSettings, main, run_demo
from trainer.sim.demo_photos import ensure_package
from trainer.sim.drift_streams import ESTIMATES, detection_delays, estimation_errors, false_alarms, mae_points
from trainer.sim.fleet import oracle_label
from trainer.sim.telemetry import Condition, FramePool, Simulator
from trainer.sim.tiny import build_tiny_package
from trainer.sim.windows import NUM_CLASSES, model_ref, tiny_window, windows

__all__ = [
    "build_tiny_package",
    "Condition",
    "DemoSettings",
    "detection_delays",
    "ensure_package",
    "ESTIMATES",
    "estimation_errors",
    "false_alarms",
    "FramePool",
    "mae_points",
    "main",
    "model_ref",
    "NUM_CLASSES",
    "oracle_label",
    "run_demo",
    "Simulator",
    "tiny_window",
    "windows",
]
