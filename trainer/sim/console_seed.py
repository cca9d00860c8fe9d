"""A seeded trainer store for the console's tests, screenshots and benchmark: a fleet with online,
offline and drifting devices, real telemetry windows of a tiny model, samples to label, alerts, and a
canary running in a real signed repository (so promote and abort do what they do in production)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from sqlalchemy import update

from edge_agent.package import ModelPackage
from edge_agent.protocol import Histogram, ModelRef, Status, TelemetryWindow
from trainer.console.auth import hash_password
from trainer.fleet.rollout import RolloutManager
from trainer.fleet.rollout_policy import RolloutConfig
from trainer.release.repository import ReleaseRepository
from trainer.sim.tiny import LABELS, build_tiny_package
from trainer.sim.windows import windows
from trainer.store import Rollout, Store
from trainer.store.console_queries import HealthRow, put_device_health, record_rollout_check
from trainer.store.console_users import ROLES, add_user

PASSWORD = "fleet-console-{role}"
"""Each seeded user ``<role>1`` has this password with its role filled in."""


@dataclass
class ConsoleSeed:
    fleet: str
    devices: list[str]
    drifting: list[str]
    champion: ModelPackage
    candidate: ModelPackage
    rollout_id: int
    repo_path: Path
    users: dict[str, tuple[str, str]] = field(default_factory=dict)
    """role -> (user name, password)."""


def seed_users(store: Store) -> dict[str, tuple[str, str]]:
    """One user per role: viewer1, labeller1, operator1, admin1."""
    out = {}
    for role in ROLES:
        name, password = f"{role}1", PASSWORD.format(role=role)
        add_user(store, name, hash_password(password), role, actor="seed")
        out[role] = (name, password)
    return out


def _ref(pkg: ModelPackage, artifact: str = "onnx-fp32") -> ModelRef:
    m = pkg.manifest
    return ModelRef(name=m.name, version=m.version, sha256=pkg.sha256, artifact=artifact)


def _jpeg(colour: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.zeros((48, 48, 3), np.uint8)
    img[..., 2 - colour % 3] = 200
    img = np.clip(img.astype(int) + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _telemetry(
    store: Store, seed: ConsoleSeed, now: float, hours: float, window_s: float, frames: int
) -> None:
    count = max(1, int(hours * 3600 / window_s))
    start = now - count * window_s
    for i, device in enumerate(seed.devices):
        dark = device in seed.drifting
        ws = windows(
            device,
            count,
            fleet=seed.fleet,
            model=_ref(seed.champion),
            frames_per_window=frames,
            start=start,
            seed=i,
            window_s=window_s,
            num_classes=len(LABELS),
            edges=seed.champion.manifest.telemetry_edges,
            confidence_beta=(2.0, 3.0) if dark else (6.0, 1.5),
        )
        store.add_windows(_inputs_like_reference(ws, seed.champion, dark, np.random.default_rng(i)))
        state: Literal["online", "offline"] = "offline" if i % 4 == 3 else "online"
        store.add_statuses(
            [
                Status(
                    fleet=seed.fleet,
                    device=device,
                    state=state,
                    session=1,
                    ts=now - (600 if state == "offline" else 5),
                    agent_version="0.1.0",
                    model=_ref(seed.champion),
                )
            ]
        )


INPUTS = ("brightness", "contrast", "saturation", "log_laplacian_var")


def _inputs_like_reference(
    ws: list[TelemetryWindow], pkg: ModelPackage, dark: bool, rng: np.random.Generator
) -> list[TelemetryWindow]:
    """Input-statistic histograms drawn from the model's reference (a camera like the training data),
    or, for a dark camera, with brightness and saturation pushed into the lowest bins."""
    ref = pkg.manifest.reference
    if ref is None:
        return ws
    out = []
    for w in ws:
        hists = dict(w.histograms)
        for name in INPUTS:
            r = ref.histograms.get(name)
            if r is None or name not in hists:
                continue
            p = np.asarray(r.counts, float)
            if dark and name in ("brightness", "saturation"):
                p = np.exp(-np.arange(len(p)) / 1.5)  # most frames in the darkest bins
            counts = rng.multinomial(sum(hists[name].counts), p / p.sum()).tolist()
            hists[name] = Histogram(edges=list(r.edges), counts=counts)
        out.append(w.model_copy(update={"histograms": hists}))
    return out


def _health(store: Store, seed: ConsoleSeed, now: float) -> None:
    rows = {}
    for i, device in enumerate(seed.devices):
        dark = device in seed.drifting
        acc = 0.35 if dark else 0.95 - 0.01 * (i % 5)  # near the windows' own ATC (the charts' line)
        labelled = i % 3 == 0
        half = 0.05 if labelled else 0.0
        rows[device] = HealthRow(
            model_sha256=seed.champion.sha256,
            drift_state="drift" if dark else ("warning" if i % 7 == 5 else "ok"),
            reference="training",
            estimated_accuracy=acc,
            low=acc - half if labelled else None,
            high=min(1.0, acc + half) if labelled else None,
            method="ppi++" if labelled else "calibrated",
            labels=8 if labelled else 0,
            frames_per_second=0.2 + 0.01 * i,
            confidence_mean=0.45 if dark else 0.8,
            artifact="onnx-fp32",
        )
    put_device_health(store, seed.fleet, rows, now)


def _samples(store: Store, seed: ConsoleSeed, now: float, per_device: int) -> None:
    for i, device in enumerate(seed.drifting):
        for k in range(per_device):
            colour = (i + k) % len(LABELS)
            image = _jpeg(colour, 100 * i + k)
            probs = sorted(np.random.default_rng(k).dirichlet([2, 1, 1]).tolist(), reverse=True)
            top = [[(colour + j) % len(LABELS), round(p, 3)] for j, p in enumerate(probs)]
            store.add_sample(
                fleet=seed.fleet,
                device=device,
                ts=now - 60 * (per_device - k),
                consent_policy="site-opt-in",
                sha256=hashlib.sha256(image).hexdigest(),
                model_sha256=seed.champion.sha256,
                image=image,
                provenance={"reason": "audit" if k % 2 else "drift", "top": top, "faces_blurred": 0},
            )


def _rollout(store: Store, seed: ConsoleSeed, repo: ReleaseRepository, now: float) -> int:
    mgr = RolloutManager(
        store,
        repo,
        None,
        fleet=seed.fleet,
        model=seed.champion.manifest.name,
        cfg=RolloutConfig(canary_share=0.3),
    )
    mgr.release_stable(seed.champion, actor="seed")
    active = mgr.start_canary(seed.candidate, seed.champion.sha256, actor="seed")
    with store.write() as conn:  # the canary started five minutes ago: its looks come after the start
        conn.execute(update(Rollout).where(Rollout.id == active.rollout_id).values(started_at=now - 300))
    for k in range(4):
        p = 0.4 / (k + 1)
        record_rollout_check(
            store,
            active.rollout_id,
            now - 240 + 60 * k,
            {
                "decision": "wait",
                "canary_accuracy": 0.86 + 0.01 * k,
                "control_accuracy": 0.84,
                "p_noninferior": p,
                "canary_windows": 4 * (k + 1),
                "control_windows": 10 * (k + 1),
                "reasons": [f"look {k + 1}: p = {p:.3f}, not yet below the 0.05 bound"],
            },
        )
    return active.rollout_id


def seed_console(
    store: Store,
    root: Path,
    *,
    fleet: str = "shop",
    devices: int = 12,
    hours: float = 6.0,
    window_s: float = 60.0,
    frames_per_window: int = 12,
    samples_per_device: int = 4,
    now: float,
) -> ConsoleSeed:
    """Fill ``store`` (and a repository under ``root``) with a fleet the console can show."""
    champion = build_tiny_package(root / "packages" / "1.0.0", version="1.0.0", overwrite=True)
    candidate = build_tiny_package(root / "packages" / "2.0.0", version="2.0.0", overwrite=True)
    names = [f"cam-{i:03d}" for i in range(devices)]
    drifting = names[1 :: max(2, math.ceil(devices / 3))][: max(1, devices // 4)]
    repo_path = root / "repo"
    repo = ReleaseRepository.init(repo_path)
    seed = ConsoleSeed(fleet, names, drifting, champion, candidate, 0, repo_path)
    seed.rollout_id = _rollout(store, seed, repo, now)
    _telemetry(store, seed, now, hours, window_s, frames_per_window)
    _health(store, seed, now)
    _samples(store, seed, now, samples_per_device)
    for device in drifting:
        store.record_alert(
            kind="drift",
            message=f"{device}: drift in brightness, contrast (2 windows)",
            fleet=fleet,
            device=device,
            dedupe_key=f"seed-drift-{fleet}-{device}",
        )
    seed.users = seed_users(store)
    return seed
