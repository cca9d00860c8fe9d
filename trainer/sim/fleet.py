"""Fleet simulator: N simulated cameras running the real agent, with scheduled domain shifts.

Each simulated device is a real :class:`~edge_agent.agent.Agent` (preprocessing, runtime, telemetry,
spool, MQTT link, updater) whose frame source renders scenes of the built-in dataset
(:func:`trainer.data.scenes.render_frame`). What a frame shows is a deterministic function of
(device, session, frame index) (:func:`true_label`), so the simulation's ground truth needs no shared
state: the oracle labeller (a simulation component standing in for people) and the accuracy tracker
recompute it. Devices run as threads of one process (``mode="threads"``, light, for large N) or as
separate processes (``mode="processes"``, each a full agent process).

A :class:`ShiftSchedule` says from which second which devices see which domain (e.g. night lighting
on 30% of the fleet from t=120 s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, validate_config
from edge_agent.sources.base import FrameSource
from trainer.data.scenes import BASE_DOMAINS, CLASSES, Domain, render_frame

log = logging.getLogger(__name__)


def true_label(device: str, session: int, frame: int, num_classes: int = len(CLASSES)) -> int:
    """The class a simulated camera shows in a frame: the simulation's ground truth."""
    digest = hashlib.sha256(f"{device}/{session}/{frame}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % num_classes


def base_domain(device: str, frame: int) -> Domain:
    """The training domain a frame is seen in: cameras see the same mix of conditions as the training data
    (a fleet-wide reference assumes it; per-site baselines are future work, see docs/fleet.md)."""
    digest = hashlib.sha256(f"{device}#{frame}".encode()).digest()
    return BASE_DOMAINS[digest[0] % len(BASE_DOMAINS)]


@dataclass(frozen=True)
class Shift:
    """From ``start_s`` (seconds after the simulation starts) ``devices`` see ``domain`` overrides."""

    start_s: float
    devices: frozenset[str]
    lighting: str | None = None
    background: str | None = None
    sensor: str | None = None

    def apply(self, domain: Domain) -> Domain:
        return Domain(
            lighting=self.lighting or domain.lighting,
            background=self.background or domain.background,
            sensor=self.sensor or domain.sensor,
        )

    @property
    def name(self) -> str:
        parts = [p for p in (self.lighting, self.background, self.sensor) if p]
        return "+".join(parts) or "none"


@dataclass
class ShiftSchedule:
    shifts: list[Shift] = field(default_factory=list)

    def domain(self, device: str, elapsed_s: float, frame: int = 0) -> Domain:
        d = base_domain(device, frame)
        for s in self.shifts:
            if elapsed_s >= s.start_s and device in s.devices:
                d = s.apply(d)
        return d

    def shifted(self, device: str, elapsed_s: float) -> bool:
        return any(elapsed_s >= s.start_s and device in s.devices for s in self.shifts)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "start_s": s.start_s,
                "devices": sorted(s.devices),
                "lighting": s.lighting,
                "background": s.background,
                "sensor": s.sensor,
            }
            for s in self.shifts
        ]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> ShiftSchedule:
        return cls(
            [
                Shift(
                    d["start_s"],
                    frozenset(d["devices"]),
                    d.get("lighting"),
                    d.get("background"),
                    d.get("sensor"),
                )
                for d in data
            ]
        )


class SimulatedCamera(FrameSource):
    """A live camera rendering the device's scene at ``fps``; the domain follows the schedule."""

    live = True

    def __init__(
        self,
        device: str,
        session: int,
        schedule: ShiftSchedule,
        t0: float,
        fps: float = 2.0,
        size: tuple[int, int] = (320, 240),
    ) -> None:
        super().__init__(f"sim:{device}")
        self.device, self.session, self.schedule, self.t0 = device, session, schedule, t0
        self.period = 1.0 / fps
        self.size = size
        self._n = 0
        self._next = 0.0

    def _open(self) -> None:
        self._next = time.monotonic()

    def _grab(self) -> np.ndarray | None:
        wait = self._next - time.monotonic()
        if wait > 0:
            self._wait(wait)
        self._next = max(self._next + self.period, time.monotonic() - self.period)
        label = true_label(self.device, self.session, self._n)
        domain = self.schedule.domain(self.device, time.time() - self.t0, self._n)
        rng = np.random.default_rng([self.session, self._n, int.from_bytes(self.device.encode()[:8], "big")])
        self._n += 1
        return render_frame(label, domain, rng, self.size)


def device_config(
    device: str,
    fleet: str,
    workdir: Path,
    factory_package: Path,
    broker_url: str,
    *,
    repo_url: str | None = None,
    root: Path | None = None,
    window_seconds: float = 10.0,
    sampling_consent: str | None = "simulation",
    extra: dict[str, Any] | None = None,
) -> AgentConfig:
    """The agent config of one simulated device (update channel ``auto``: canary cohorts apply)."""
    data: dict[str, Any] = {
        "device_id": device,
        "fleet": fleet,
        "state_dir": str(workdir / device),
        "source": {"uri": f"sim:{device}"},
        "model": {"package": str(factory_package), "artifact": "auto"},
        "mqtt": {"url": broker_url, "reconnect_min_s": 0.2, "reconnect_max_s": 3.0},
        "telemetry": {"window_seconds": window_seconds, "publish_predictions": True},
        "spool": {"flush_timeout_s": 2.0},
    }
    if sampling_consent:
        data["sampling"] = {
            "enabled": True,
            "consent": sampling_consent,
            "per_window": 3,
            "max_per_hour": 3600,
        }
    if repo_url and root:
        data["update"] = {
            "repository": repo_url,
            "root": str(root),
            "channel": "auto",
            "poll_seconds": 15,
            "health_windows": 2,
            "latency_budget_ms": 400,
        }
    if extra:
        data.update(extra)
    return validate_config(data, f"simulated device {device}")


def _run_agent(cfg: AgentConfig, schedule: ShiftSchedule, t0: float, fps: float, stop: Any) -> None:
    agent = Agent(
        cfg, source_factory=lambda session: SimulatedCamera(cfg.device_id, session, schedule, t0, fps)
    )

    def watch() -> None:
        stop.wait()
        agent.stop()

    threading.Thread(target=watch, daemon=True).start()
    agent.run()


def _process_main(cfg_json: str, schedule_json: str, t0: float, fps: float, stop: Any) -> None:
    logging.basicConfig(level=logging.WARNING)
    cfg = AgentConfig.model_validate_json(cfg_json)
    _run_agent(cfg, ShiftSchedule.from_json(json.loads(schedule_json)), t0, fps, stop)


class FleetSimulator:
    """Starts and stops the simulated devices."""

    def __init__(
        self,
        configs: Sequence[AgentConfig],
        schedule: ShiftSchedule,
        *,
        fps: float = 2.0,
        mode: str = "threads",
    ) -> None:
        if mode not in ("threads", "processes"):
            raise ValueError("mode must be threads or processes")
        self.configs = list(configs)
        self.schedule = schedule
        self.fps = fps
        self.mode = mode
        self.t0 = 0.0
        self._workers: list[Any] = []
        self._stop: Any = None

    @property
    def devices(self) -> list[str]:
        return [c.device_id for c in self.configs]

    def elapsed(self) -> float:
        return time.time() - self.t0

    def start(self) -> FleetSimulator:
        self.t0 = time.time()
        if self.mode == "threads":
            self._stop = threading.Event()
            for cfg in self.configs:
                t = threading.Thread(
                    target=_run_agent,
                    args=(cfg, self.schedule, self.t0, self.fps, self._stop),
                    name=f"sim-{cfg.device_id}",
                    daemon=True,
                )
                t.start()
                self._workers.append(t)
        else:
            ctx = mp.get_context("spawn")
            self._stop = ctx.Event()
            sched = json.dumps(self.schedule.to_json())
            for cfg in self.configs:
                p = ctx.Process(
                    target=_process_main,
                    args=(cfg.model_dump_json(), sched, self.t0, self.fps, self._stop),
                    name=f"sim-{cfg.device_id}",
                    daemon=True,
                )
                p.start()
                self._workers.append(p)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._stop is None:
            return
        self._stop.set()
        deadline = time.time() + timeout
        for w in self._workers:
            w.join(max(0.1, deadline - time.time()))
            if self.mode == "processes" and w.is_alive():
                w.terminate()
        self._workers.clear()


def true_class(device: str, session: int, frame: int) -> str:
    """The class name a simulated camera shows in a frame."""
    return CLASSES[true_label(device, session, frame)]


def oracle_label(provenance: dict[str, Any]) -> str | None:
    """The simulation's ground truth for a sample (a simulation component, standing in for people)."""
    try:
        return true_class(provenance["device"], int(provenance["session"]), int(provenance["frame"]))
    except (KeyError, ValueError, TypeError):
        return None
