"""Drift engine and label-free accuracy benchmark on simulated camera streams through the real int8 model.

    python -m bench.drift_bench                   # writes bench/results/drift.json and prints tables
    python -m bench.drift_bench --quick           # small smoke run (numbers not comparable)
    python -m bench.drift_bench --package PKG     # use an existing package instead of training one

Setup. A package is trained on ``builtin:shapes?n=250`` (2,000 rendered frames, default 70/15/15 split,
so the drift reference and the ATC threshold come from ~600 held-out frames; default 224-pixel input,
robustness evaluation off) and cached under ``build/bench/drift/``. Frames are rendered per condition
(clean base domains; 14 ImageNet-C corruptions x severities 1..5; 7 domain shifts) and run once through
the package's device artifact (tflite-int8) with the agent's code path (:mod:`trainer.sim.telemetry`);
the per-frame results are cached too. Windows of 300 frames (60 s at 5 fps, the agent's default window)
are built by resampling frames from a condition's pool.

Measured:

* engine cost: ``DriftMonitor.step`` per device window, alone and in fleet steps of N devices;
* false alarms: entries into ``drift`` on clean streams per device-week (10,080 one-minute windows),
  for the package's reference and for other references drawn from fresh clean frames, of the same size
  and smaller (152 held-out frames is what ``edgefleet train --data builtin:shapes`` writes), each with
  the engine's reference-robust p-values and with plain two-sample p-values;
* detection: per condition, trials of 3 clean windows then shifted windows; share detected (state
  ``drift``) within 1 and 2 shifted windows, and the median delay;
* window size: false alarms and detection with 12 s to 2 min windows;
* correlated frames: each scene seen for k consecutive frames, with the engine's per-device dispersion
  estimate and assuming independent frames;
* label-free accuracy: ATC (max-softmax, counted on the device), ATC-NE (negative entropy, from the
  entropy histograms) and average confidence against the true accuracy per condition (all of the pool's
  frames: the stream's accuracy) and per 300-frame window; MAE in accuracy points.

Targets (brief): drift within 2 windows at severity >= 3 with <= 1 false alarm per device-week; ATC MAE
<= 3 points on corrupted streams (ATC paper, CIFAR-10-C: 3.87; average confidence 11.9).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "drift.json"
CACHE = ROOT / "build" / "bench" / "drift"
DATA = "builtin:shapes?n=250"
SHIFTS: dict[str, dict[str, str]] = {
    "night": {"lighting": "night"},
    "glare": {"lighting": "glare"},
    "clutter": {"background": "clutter"},
    "tiles": {"background": "tiles"},
    "noisy": {"sensor": "noisy"},
    "soft": {"sensor": "soft"},
    "lowres": {"sensor": "lowres"},
}


def log(msg: str) -> None:
    print(f"[drift-bench] {msg}", file=sys.stderr, flush=True)


def ensure_package(path: Path, data: str, input_size: int) -> Path:
    """Train the benchmark package once (about 4 minutes on 2 cores) and reuse it."""
    if (path / "model.json").is_file():
        return path
    from trainer.build import RobustnessConfig, TrainConfig, train_package
    from trainer.data import load_dataset

    log(f"training {data} at {input_size} px into {path}")
    t = time.perf_counter()
    config = TrainConfig(
        name="shapes",
        input_size=input_size,
        robustness=RobustnessConfig(enabled=False),
        progress=False,
        feature_cache=str(path.parent / "features"),
        threads=1,
    )
    train_package(load_dataset(data), path, config)
    log(f"trained in {time.perf_counter() - t:.0f} s")
    return path


class PoolCache:
    """Frame pools on disk, keyed by package, condition, size and seed (inference is the slow part)."""

    def __init__(self, sim: Any, directory: Path | None) -> None:
        self.sim = sim
        self.dir = directory
        self.seconds = 0.0
        self.rendered = 0

    def get(self, condition: Any, frames: int, seed: int) -> Any:
        key = f"{self.sim.package.sha256[:12]}-{self.sim.artifact}-{condition.name}-{frames}-{seed}.pkl"
        path = self.dir / key if self.dir else None
        if path is not None and path.is_file():
            with open(path, "rb") as f:
                return pickle.load(f)
        t = time.perf_counter()
        pool = self.sim.pool(condition, frames, seed)
        self.seconds += time.perf_counter() - t
        self.rendered += frames
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                pickle.dump(pool, f)
        return pool


def engine_cost(pool: Any, reference: Any, fleet_sizes: list[int], repeats: int) -> dict[str, Any]:
    """Milliseconds per ``DriftMonitor.step`` for one device and for fleet steps (windows prebuilt)."""
    from trainer.drift.detector import DriftMonitor

    rng = np.random.default_rng(5)
    out: dict[str, Any] = {}
    monitor = DriftMonitor()
    windows = [pool.fast_window(rng.integers(0, len(pool), 300), device="cam", seq=i) for i in range(repeats)]
    monitor.step({"cam": windows[0]}, reference)  # warm the null-threshold cache
    times = []
    for w in windows:
        t = time.perf_counter()
        monitor.step({"cam": w}, reference)
        times.append(time.perf_counter() - t)
    out["device_window_ms"] = round(1000 * float(np.median(times)), 3)
    t = time.perf_counter()
    for _ in range(repeats):
        pool.fast_window(rng.integers(0, len(pool), 300))
    out["simulated_window_build_ms"] = round(1000 * (time.perf_counter() - t) / repeats, 3)
    for n in fleet_sizes:
        monitor = DriftMonitor()
        steps = max(2, repeats // n)
        batch = [{f"cam{i}": windows[(s * n + i) % len(windows)] for i in range(n)} for s in range(steps)]
        t = time.perf_counter()
        for b in batch:
            monitor.step(b, reference)
        ms = 1000 * (time.perf_counter() - t) / steps
        out[f"fleet_{n}_step_ms"] = round(ms, 2)
        out[f"fleet_{n}_per_window_ms"] = round(ms / n, 3)
    return out


def detection_within_2(
    clean: Any, pools: Any, ref: Any, corruptions: list[str], trials: int, cfg: Any, seed: int, **stream: Any
) -> dict[str, Any]:
    """Share of trials detected within 2 windows, averaged over corruptions, at severities 1 and 3
    (and the corruptions below 90%), for one stream setting (window size, frames per scene)."""
    from trainer.sim.drift_streams import detection_delays

    row: dict[str, Any] = {}
    for sev in (1, 3):
        rates = [
            detection_delays(
                clean, pools[(n, sev)], ref, trials=trials, cfg=cfg, rng=np.random.default_rng(seed), **stream
            ).rate_within[2]
            for n in corruptions
        ]
        row[f"severity_{sev}_within_2"] = float(np.mean(rates))
        row[f"severity_{sev}_missed"] = [n for n, r in zip(corruptions, rates) if r < 0.9]
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_agent.package import load_package
    from trainer.data.corruptions import CORRUPTIONS, FAMILIES, SEVERITIES
    from trainer.drift.detector import DriftConfig
    from trainer.sim.drift_streams import (
        ESTIMATES,
        detection_delays,
        estimation_errors,
        false_alarms,
        mae_points,
    )
    from trainer.sim.telemetry import Condition, Simulator

    pkg_path = (
        Path(args.package)
        if args.package
        else ensure_package(CACHE / f"package-{args.input_size}", args.data, args.input_size)
    )
    pkg = load_package(pkg_path)
    ref = pkg.manifest.reference
    assert ref is not None and ref.atc_threshold is not None
    cfg = DriftConfig()
    corruptions = list(CORRUPTIONS)[: args.corruptions] if args.corruptions else list(CORRUPTIONS)
    severities = list(SEVERITIES)
    from bench.accuracy_bench import cpu_flags

    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_flags": cpu_flags(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "quick": args.quick,
        "package": {
            "path": str(pkg_path),
            "name": pkg.manifest.name,
            "sha256": pkg.sha256,
            "artifact": ref.artifact,
            "input_size": list(pkg.manifest.preprocess.size),
            "temperature": pkg.manifest.temperature,
            "reference_images": ref.images,
            "reference_accuracy": ref.accuracy,
            "atc_threshold": ref.atc_threshold,
            "dataset": (pkg.manifest.provenance or {}).get("dataset"),
        },
        "config": {**cfg.model_dump(mode="json"), "window_frames": 300, "window_seconds": 60, "fps": 5},
        "setup": {
            "clean_frames": args.clean_frames,
            "frames_per_condition": args.frames,
            "trials": args.trials,
            "device_weeks": args.device_weeks,
            "fa_devices": args.devices,
            "estimate_windows": args.estimate_windows,
        },
    }

    with Simulator(pkg) as sim:
        cache = PoolCache(sim, None if args.no_cache else CACHE / "pools")
        t = time.perf_counter()
        clean = cache.get(Condition.clean(), args.clean_frames, 1)
        clean_b = cache.get(Condition.clean(), args.clean_frames, 2)
        pools = {}
        for name in corruptions:
            for s in severities:
                pools[(name, s)] = cache.get(Condition.corrupted(name, s), args.frames, 1)
            log(f"pools: {name} ({time.perf_counter() - t:.0f} s)")
        shifts = {k: cache.get(Condition.shifted(**v), args.frames, 1) for k, v in SHIFTS.items()}
        log(f"pools ready: {cache.rendered} frames rendered and inferred in {cache.seconds:.0f} s")
        results["pools"] = {
            "rendered_now": cache.rendered,
            "seconds": round(cache.seconds, 1),
            "ms_per_frame": round(1000 * cache.seconds / cache.rendered, 2) if cache.rendered else None,
        }

    # 1. cost
    results["cost"] = engine_cost(clean, ref, [100, 1000], repeats=2000 if not args.quick else 200)
    log(f"cost: {results['cost']}")

    # 2. false alarms on clean streams (plain p-values on the same windows, for comparison)
    t = time.perf_counter()
    plain = DriftConfig(reference_coverage=None)
    steps = max(1, round(args.device_weeks * 10_080 / args.devices))
    fa: dict[str, Any] = {}
    for name, c in (("robust", cfg), ("plain", plain)):
        fa[f"fleet_{name}"] = false_alarms(
            clean, ref, devices=args.devices, steps=steps, cfg=c, rng=np.random.default_rng(11)
        ).as_dict()
    week = max(1, round(10_080 * min(1.0, args.device_weeks)))
    fa["single_device"] = false_alarms(
        clean, ref, devices=1, steps=week, cfg=cfg, rng=np.random.default_rng(12)
    ).as_dict()
    log(
        f"false alarms: {fa['fleet_robust']['drift_entries']} in {fa['fleet_robust']['device_weeks']:.1f} device-weeks ({time.perf_counter() - t:.0f} s)"
    )
    rng = np.random.default_rng(13)
    fa["reference_draws"] = {}
    for size in sorted({min(ref.images, len(clean_b)), *args.ref_sizes}, reverse=True):
        draws: dict[str, list[dict[str, Any]]] = {"robust": [], "plain": []}
        for k in range(args.ref_draws):
            alt = clean_b.reference(rng.choice(len(clean_b), size=size, replace=False))
            for name, c in (("robust", cfg), ("plain", plain)):
                r = false_alarms(
                    clean,
                    alt,
                    devices=args.devices,
                    steps=max(1, round(10_080 / args.devices)),
                    cfg=c,
                    rng=np.random.default_rng(100 + k),
                )
                draws[name].append(r.as_dict())
        if args.ref_draws:
            fa["reference_draws"][str(size)] = {
                "draws": args.ref_draws,
                "device_weeks_each": round(draws["robust"][0]["device_weeks"], 2),
                **{
                    f"{n}_per_device_week": [round(d["per_device_week"], 2) for d in v]
                    for n, v in draws.items()
                },
                **{f"{n}_flagged_rate": [round(d["flagged_rate"], 6) for d in v] for n, v in draws.items()},
            }
            log(f"reference draws of {size} frames: {fa['reference_draws'][str(size)]}")
    results["false_alarms"] = fa

    # 3. detection per condition
    t = time.perf_counter()
    det: dict[str, Any] = {}
    for pool in [*pools.values(), *shifts.values()]:
        d = detection_delays(clean, pool, ref, trials=args.trials, cfg=cfg, rng=np.random.default_rng(21))
        det[pool.condition.name] = {
            "within_1": d.rate_within[1],
            "within_2": d.rate_within[2],
            f"within_{d.max_windows}": d.rate_within[d.max_windows],
            "median_delay": d.median_delay,
        }
    results["detection"] = det
    log(f"detection done ({time.perf_counter() - t:.0f} s)")

    # 4. window size: false alarms and detection at severities 1 and 3 with shorter and longer windows
    t = time.perf_counter()
    sweep: dict[str, Any] = {}
    for frames in args.window_sweep:
        f = false_alarms(
            clean,
            ref,
            devices=args.devices,
            steps=max(1, round(10_080 / args.devices)),
            cfg=cfg,
            rng=np.random.default_rng(41),
            window_frames=frames,
        )
        row: dict[str, Any] = {
            "seconds_at_5fps": frames / 5,
            "per_device_week": f.per_device_week,
            "flagged_rate": f.flagged_rate,
        }
        row.update(
            detection_within_2(
                clean, pools, ref, corruptions, max(2, args.trials // 5), cfg, seed=42, window_frames=frames
            )
        )
        sweep[str(frames)] = row
    results["window_sweep"] = sweep
    log(f"window sweep done ({time.perf_counter() - t:.0f} s)")

    # 5. correlated frames: each scene seen for k consecutive frames (an object in view for k/5 s)
    t = time.perf_counter()
    corr: dict[str, Any] = {}
    independent = DriftConfig(design_effect=1.0)
    for k in args.frames_per_scene:
        row = {}
        for name, c in (("estimated", cfg), ("assumed_independent", independent)):
            f = false_alarms(
                clean,
                ref,
                devices=args.devices,
                steps=max(1, round(10_080 / args.devices)),
                cfg=c,
                rng=np.random.default_rng(51),
                frames_per_scene=k,
            )
            row[f"{name}_per_device_week"], row[f"{name}_flagged_rate"] = f.per_device_week, f.flagged_rate
        row.update(
            detection_within_2(
                clean, pools, ref, corruptions, max(2, args.trials // 5), cfg, seed=52, frames_per_scene=k
            )
        )
        corr[str(k)] = row
    results["frames_per_scene"] = corr
    log(f"correlated frames done ({time.perf_counter() - t:.0f} s)")

    # 6. label-free accuracy
    est: dict[str, Any] = {}
    errors = {}
    rng = np.random.default_rng(31)
    for pool in [clean, clean_b, *pools.values(), *shifts.values()]:
        e = estimation_errors(pool, ref, windows=args.estimate_windows, rng=rng)
        key = pool.condition.name if pool is not clean_b else "clean (second pool)"
        errors[key] = e
        est[key] = {
            "frames": e.frames,
            "accuracy": e.accuracy,
            **e.stream,
            **{f"{k}_error_points": 100 * v for k in ESTIMATES if (v := e.error(k)) is not None},
            **{f"window_{k}_mae_points": 100 * v for k, v in e.window_mae.items() if v is not None},
        }
    corrupted = {k: errors[p.condition.name] for k, p in pools.items()}
    summary: dict[str, Any] = {
        "corrupted_all": mae_points({p.condition.name: errors[p.condition.name] for p in pools.values()}),
        "corrupted_severity_3_to_5": mae_points(
            {f"{n}@{s}": corrupted[(n, s)] for n in corruptions for s in severities if s >= 3}
        ),
        "domain_shifts": mae_points({p.condition.name: errors[p.condition.name] for p in shifts.values()}),
        "clean": mae_points({"clean": errors["clean"], "clean2": errors["clean (second pool)"]}),
    }
    for s in severities:
        summary[f"severity_{s}"] = mae_points({f"{n}@{s}": corrupted[(n, s)] for n in corruptions})
    for fam, names in FAMILIES.items():
        if any(n in corruptions for n in names):
            summary[f"family_{fam}"] = mae_points(
                {f"{n}@{s}": corrupted[(n, s)] for n in names if n in corruptions for s in severities}
            )
    results["estimation"] = {"per_condition": est, "mae": summary}
    return results


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_tables(r: dict[str, Any]) -> None:
    p = r["package"]
    print(
        f"\n== drift engine and label-free accuracy: {p['name']} ({p['dataset']}), {p['artifact']} at "
        f"{p['input_size'][0]} px; reference {p['reference_images']} held-out frames, accuracy {p['reference_accuracy']:.1%}, "
        f"ATC threshold {p['atc_threshold']:.3f}, temperature {p['temperature']:.3f}"
    )
    print(
        f"   windows of 300 frames (60 s at 5 fps) resampled from per-condition pools ({r['setup']['frames_per_condition']} frames; clean {r['setup']['clean_frames']})"
    )
    c = r["cost"]
    fleet = ", ".join(
        f"{n} devices {c[f'fleet_{n}_step_ms']} ms/step ({c[f'fleet_{n}_per_window_ms']} ms/window)"
        for n in (100, 1000)
    )
    print(
        f"\n-- engine cost: {c['device_window_ms']} ms per device window (one-device step); fleet steps: {fleet}"
    )
    fa = r["false_alarms"]
    for key, label in (
        ("fleet_robust", "fleet steps"),
        ("fleet_plain", "fleet steps, plain p-values"),
        ("single_device", "one device"),
    ):
        f = fa[key]
        print(
            f"-- false alarms ({label}, {f['devices']} device(s)): {f['drift_entries']} drift entries in "
            f"{f['windows']:,} clean windows = {f['device_weeks']:.1f} device-weeks -> {f['per_device_week']:.2f} per device-week "
            f"(target <= 1); windows flagged {f['flagged_rate']:.3%}, warnings {f['warning_entries']}"
        )
    for size, d in fa.get("reference_draws", {}).items():
        print(
            f"   {d['draws']} other references of {size} fresh clean frames ({d['device_weeks_each']} device-week(s) each), false alarms "
            f"per device-week: robust {d['robust_per_device_week']}, plain p-values {d['plain_per_device_week']}"
        )
    det = r["detection"]
    est = r["estimation"]["per_condition"]
    names = sorted({k.split("@")[0] for k in det if "@" in k}, key=lambda n: list(det).index(f"{n}@1"))
    print(
        "\n-- per corruption and severity: detected within 2 windows (share of trials) / median delay (windows) | accuracy: true ATC ATC-NE avg-conf"
    )
    print(f"   {'corruption':18s}" + "".join(f"{'sev ' + str(s):>25s}" for s in range(1, 6)))
    for n in names:
        cells = []
        for s in range(1, 6):
            k = f"{n}@{s}"
            e = est[k]
            acc = " ".join(
                _fmt(None if e[x] is None else 100 * e[x], "3.0f")
                for x in ("accuracy", "atc", "atc_ne", "average_confidence")
            )
            cells.append(f"{det[k]['within_2']:4.0%}/{_fmt(det[k]['median_delay'], 'g'):>2s} {acc}")
        print(f"   {n:18s}" + "".join(f"{c:>25s}" for c in cells))
    print(
        f"\n   {'domain shift':18s} {'within 2':>9s} {'delay':>6s} {'true':>6s} {'ATC':>6s} {'ATC-NE':>7s} {'avg conf':>9s}"
    )
    for k, v in det.items():
        if "@" in k:
            continue
        e = est[k]
        print(
            f"   {k:18s} {v['within_2']:9.0%} {_fmt(v['median_delay'], 'g'):>6s} {e['accuracy']:6.1%} {_fmt(e['atc'], '6.1%')} "
            f"{_fmt(e['atc_ne'], '7.1%')} {e['average_confidence']:9.1%}"
        )
    if r.get("window_sweep"):
        print(
            "\n-- window size (frames at 5 fps): false alarms per device-week, detected within 2 windows (mean over corruptions)"
        )
        for frames, w in r["window_sweep"].items():
            print(
                f"   {frames:>4s} frames ({w['seconds_at_5fps']:.0f} s): {w['per_device_week']:.2f} per device-week, flagged {w['flagged_rate']:.3%}; "
                f"severity 1 {w['severity_1_within_2']:.0%}, severity 3 {w['severity_3_within_2']:.0%}"
                + (f" (under 90%: {', '.join(w['severity_3_missed'])})" if w["severity_3_missed"] else "")
            )
    if r.get("frames_per_scene"):
        print(
            "\n-- correlated frames (each scene seen for k consecutive frames): false alarms per device-week with the dispersion"
        )
        print(
            "   estimated per device (default) and assuming independent frames; detected within 2 windows with the default"
        )
        for k, w in r["frames_per_scene"].items():
            print(
                f"   k={k:>2s}: {w['estimated_per_device_week']:.2f} (flagged {w['estimated_flagged_rate']:.2%}) vs independent "
                f"{w['assumed_independent_per_device_week']:.2f} (flagged {w['assumed_independent_flagged_rate']:.2%}); "
                f"severity 1 {w['severity_1_within_2']:.0%}, severity 3 {w['severity_3_within_2']:.0%}"
                + (f" (under 90%: {', '.join(w['severity_3_missed'])})" if w["severity_3_missed"] else "")
            )
    mae = r["estimation"]["mae"]
    print(
        "\n-- label-free accuracy MAE in points: stream level (all frames of a condition) | per 300-frame window"
    )
    print(
        f"   {'conditions':26s} {'n':>3s} {'ATC':>6s} {'ATC-NE':>7s} {'avg conf':>9s} | {'ATC':>6s} {'ATC-NE':>7s} {'avg conf':>9s}"
    )
    for k, m in mae.items():
        if m["conditions"]:
            print(
                f"   {k:26s} {m['conditions']:3d} {_fmt(m['atc'], '6.2f')} {_fmt(m['atc_ne'], '7.2f')} {_fmt(m['average_confidence'], '9.2f')} | "
                f"{_fmt(m['window_atc'], '6.2f')} {_fmt(m['window_atc_ne'], '7.2f')} {_fmt(m['window_average_confidence'], '9.2f')}"
            )
    print(
        "   target: ATC <= 3 points on corrupted streams (ATC paper, CIFAR-10-C: ATC 3.87, average confidence 11.9)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.drift_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--package", help="existing package (default: train one into build/bench/drift/)")
    ap.add_argument("--data", default=DATA, help="training data when no --package is given")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--frames", type=int, default=400, help="frames per corrupted or shifted condition")
    ap.add_argument("--clean-frames", type=int, default=3000)
    ap.add_argument("--trials", type=int, default=50, help="detection trials per condition")
    ap.add_argument("--device-weeks", type=float, default=10.0)
    ap.add_argument("--devices", type=int, default=20, help="devices per fleet step in the false-alarm run")
    ap.add_argument(
        "--ref-draws", type=int, default=5, help="other references per size for the false-alarm run"
    )
    ap.add_argument(
        "--ref-sizes",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[150, 72],
        help="sizes of the other references besides the package's (150: the default builtin:shapes run's held-out set)",
    )
    ap.add_argument("--estimate-windows", type=int, default=200)
    ap.add_argument(
        "--frames-per-scene",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[1, 5, 15],
        help="consecutive frames per scene for the correlated-frames run; empty to skip",
    )
    ap.add_argument(
        "--window-sweep",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[60, 150, 300, 600],
        help="window sizes (frames) for the window-size sweep; empty to skip",
    )
    ap.add_argument("--corruptions", type=int, default=0, help="only the first N corruptions (0: all)")
    ap.add_argument("--no-cache", action="store_true", help="render every pool again")
    ap.add_argument("--quick", action="store_true", help="small smoke run (numbers not comparable)")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.clean_frames, args.trials, args.device_weeks = 60, 300, 5, 0.2
        args.ref_draws, args.estimate_windows, args.corruptions = 1, 20, args.corruptions or 2
        args.window_sweep, args.frames_per_scene = [150], [5]
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    t = time.perf_counter()
    results = run(args)
    results["seconds"] = round(time.perf_counter() - t, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"\nwrote {out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
