"""Accuracy-estimate benchmark: label-free estimators and PPI++ on the same corrupted streams, same run.

    python -m bench.accuracy_bench               # writes bench/results/accuracy.json and prints tables
    python -m bench.accuracy_bench --quick       # small smoke run (numbers not comparable)

Setup. The drift benchmark's package and frame pools (``bench/drift_bench.py``: ``builtin:shapes``,
tflite-int8, frames rendered in a condition and run through the agent's code path, cached under
``build/bench/drift/``): clean frames, 14 ImageNet-C corruptions x severities 1..5 and 7 domain shifts
(grouped as a fifth family, ``shift``). The unit is a **range** of ``--windows`` windows of 300 frames
(10 one-minute windows by default: what the service reads for one device), frames resampled from one
condition's pool; its true accuracy is the mean correctness of its own frames.

Estimators, all on the same ranges:

* ``average_confidence``, ``atc``, ``atc_ne``: the existing baselines (:mod:`trainer.drift.estimate`);
* ``calibrated``: per-bin reference accuracy (``ReferenceStats.confidence_bin_accuracy``);
* ``regressor``: :class:`~trainer.drift.labelfree.AccuracyRegressor`, fitted **leaving the evaluated
  family out** (trained on clean and the other families' ranges, from pools of frame seed 1; evaluated
  on ranges drawn with another resampling seed); its interval is +-1.96 x its leave-one-family-out
  error within its own training families (nested: the evaluated family is never seen);
* ``labels_only@k``: the mean of k uniform audit labels per window (normal interval) - what the labels
  say without the model's help;
* ``ppi@k``: PPI++ with k uniform audit labels per window (95% normal interval). Its point estimate
  does not depend on the level of the label-free estimate (a constant shift of the frame scores cancels
  in ``lambda * mean_N f - lambda * mean_n f``), only on how well frame scores track correctness;
* ``ppi+prior@k``: PPI++ and the regressor combined by precision (the regressor's leave-one-family-out
  error as its variance): experimental, not used by the service.

Label rate: k audit frames per 300-frame window = k / 300 of the frames (k=1: 0.33%, 10 labels per
range). Targets (brief): MAE <= 3 points on corrupted streams; interval coverage >= 90% of ranges.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "accuracy.json"
FAMILY_ORDER = ("noise", "blur", "weather", "digital", "shift")


def log(msg: str) -> None:
    print(f"[accuracy-bench] {msg}", file=sys.stderr, flush=True)


def cpu_flags() -> list[str]:
    """The int8-relevant CPU flags this process runs with: under tools/cpuid_mask (LD_PRELOAD) the
    runtimes see no AVX-512, VNNI or AMX, so those are dropped and ``cpuid_mask`` is listed instead."""
    p = Path("/proc/cpuinfo")
    flags = set(p.read_text().split()) if p.exists() else set()
    flags &= {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"}
    if "cpuid_mask" in os.environ.get("LD_PRELOAD", ""):
        flags = {f for f in flags if f == "avx2"} | {"cpuid_mask"}
    return sorted(flags)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.drift_bench import CACHE, DATA, SHIFTS, PoolCache, ensure_package
    from edge_agent.package import load_package
    from trainer.data.corruptions import CORRUPTIONS, FAMILIES, SEVERITIES
    from trainer.drift.accuracy import audit_label, estimate_device_accuracy, with_prior
    from trainer.drift.estimate import estimate_accuracy
    from trainer.drift.labelfree import FEATURES, MergedWindows, fit_regressor, window_features
    from trainer.drift.ppi import AuditLabel, ppi_mean
    from trainer.sim.telemetry import Condition, Simulator

    pkg_path = Path(args.package) if args.package else ensure_package(CACHE / "package-224", DATA, 224)
    pkg = load_package(pkg_path)
    ref = pkg.manifest.reference
    assert ref is not None and ref.atc_threshold is not None
    family_of = {c: f for f, cs in FAMILIES.items() for c in cs}
    corruptions = list(CORRUPTIONS)[: args.corruptions] if args.corruptions else list(CORRUPTIONS)
    with Simulator(pkg) as sim:
        cache = PoolCache(sim, CACHE / "pools")
        pools: dict[str, tuple[str, Any]] = {
            "clean": ("clean", cache.get(Condition.clean(), args.clean_frames, 1)),
            "clean (second pool)": ("clean", cache.get(Condition.clean(), args.clean_frames, 2)),
        }
        for name in corruptions:
            for s in SEVERITIES:
                pools[f"{name}@{s}"] = (
                    family_of[name],
                    cache.get(Condition.corrupted(name, s), args.frames, 1),
                )
        for k, v in SHIFTS.items():
            pools[k] = ("shift", cache.get(Condition.shifted(**v), args.frames, 1))
        log(f"pools ready ({cache.rendered} frames rendered now in {cache.seconds:.0f} s)")
    if (
        not ref.confidence_bin_accuracy
    ):  # a package built before the field: measure it on held-out-like frames
        ref = pools["clean (second pool)"][1].reference()
        log("package reference has no confidence_bin_accuracy: using the second clean pool's")

    W, F = args.windows, 300

    def ranges(pool: Any, count: int, seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, len(pool), (W, F)) for _ in range(count)]

    def feats(pool: Any, idx: np.ndarray) -> tuple[MergedWindows, dict[str, float]]:
        m = MergedWindows.of([pool.fast_window(idx.ravel())])
        f = window_features(m, ref)
        assert f is not None
        return m, f

    # 1. training rows for the regressor: every pool, ranges from resampling seed 1
    rows: dict[str, list[tuple[str, list[float], float]]] = defaultdict(list)
    for cond, (fam, pool) in pools.items():
        if cond == "clean (second pool)":
            continue
        for idx in ranges(pool, args.train_ranges, 1):
            _, f = feats(pool, idx)
            rows[fam].append((cond, [f[k] for k in FEATURES], float(pool.correct[idx].mean())))
    regressors = {}
    for held in FAMILY_ORDER:
        train = [r for fam, rs in rows.items() if fam != held for r in rs]
        fams = [fam for fam, rs in rows.items() if fam != held for _ in rs]
        X = np.array([r[1] for r in train])
        y = np.array([r[2] for r in train])
        regressors[held] = fit_regressor(X, y, ridge=args.ridge, groups=fams)
    all_rows = [r for rs in rows.values() for r in rs]
    regressors["clean"] = fit_regressor(
        np.array([r[1] for r in all_rows]),
        np.array([r[2] for r in all_rows]),
        ridge=args.ridge,
        groups=[fam for fam, rs in rows.items() for _ in rs],
    )

    # 2. evaluation ranges (resampling seed 2), every estimator on the same ranges
    rates = args.label_rates
    names = ["average_confidence", "atc", "atc_ne", "calibrated", "regressor"]
    names += [f"labels_only@{k}" for k in rates] + [f"ppi@{k}" for k in rates]
    names += [f"ppi+prior@{k}" for k in rates]
    per_cond: dict[str, dict[str, Any]] = {}
    errs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    cover: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    widths: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    rng_audit = np.random.default_rng(3)
    for cond, (fam, pool) in pools.items():
        reg = regressors[fam if fam in regressors else "clean"]
        conf_all, correct_all = pool.values["confidence"], pool.correct
        c_errs: dict[str, list[float]] = defaultdict(list)
        for idx in ranges(pool, args.eval_ranges, 2):
            truth = float(correct_all[idx].mean())
            window = pool.fast_window(idx.ravel())
            base = estimate_accuracy([window], ref)
            est: dict[str, tuple[float | None, tuple[float, float] | None]] = {
                "average_confidence": (base.average_confidence, None),
                "atc": (base.atc, None),
                "atc_ne": (base.atc_ne, None),
            }
            lf = estimate_device_accuracy([window], ref, (), reg).label_free
            est["calibrated"] = (lf.calibrated, None)
            r = lf.regressor
            assert r is not None
            est["regressor"] = (r, (r - 1.96 * reg.residual_sd, r + 1.96 * reg.residual_sd))
            for k in rates:
                picks = np.stack([rng_audit.choice(row, k, replace=False) for row in idx]).ravel()
                audit = [
                    audit_label(
                        ts=0.0, correct=bool(correct_all[i]), confidence=float(conf_all[i]), reference=ref
                    )
                    for i in picks.tolist()
                ]
                p = estimate_device_accuracy([window], ref, audit, reg)
                est[f"ppi@{k}"] = (p.estimate, p.interval)
                c = with_prior(p, r, reg.residual_sd)
                est[f"ppi+prior@{k}"] = (c.estimate, c.interval)
                lo = ppi_mean(
                    0.0, 0.0, len(idx.ravel()), [AuditLabel(0, a.correct, 0.0) for a in audit], lam=0.0
                )
                assert lo is not None
                est[f"labels_only@{k}"] = (lo.estimate, (lo.low, lo.high))
            group = "clean" if fam == "clean" else ("corrupted" if fam != "shift" else "shift")
            for n, (value, iv) in est.items():
                if value is None:
                    continue
                e = abs(value - truth) * 100
                c_errs[n].append(e)
                for g in (group, fam):
                    errs[g][n].append(e)
                    if iv is not None:
                        cover[g][n].append(iv[0] <= truth <= iv[1])
                        widths[g][n].append((iv[1] - iv[0]) * 100)
        per_cond[cond] = {
            "family": fam,
            "frames": len(pool),
            "accuracy": pool.accuracy,
            "mae_points": {n: round(float(np.mean(v)), 3) for n, v in c_errs.items()},
        }

    def table(group: str) -> dict[str, Any]:
        return {
            n: {
                "mae_points": round(float(np.mean(errs[group][n])), 3) if errs[group][n] else None,
                "coverage": round(float(np.mean(cover[group][n])), 4) if cover[group][n] else None,
                "mean_width_points": round(float(np.mean(widths[group][n])), 2) if widths[group][n] else None,
                "ranges": len(errs[group][n]),
            }
            for n in names
        }

    return {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_flags": cpu_flags(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "quick": args.quick,
        "package": {
            "path": str(pkg_path),
            "sha256": pkg.sha256,
            "artifact": ref.artifact,
            "reference_images": ref.images,
            "reference_accuracy": ref.accuracy,
        },
        "setup": {
            "window_frames": F,
            "windows_per_range": W,
            "frames_per_condition": args.frames,
            "clean_frames": args.clean_frames,
            "train_ranges_per_condition": args.train_ranges,
            "eval_ranges_per_condition": args.eval_ranges,
            "ridge": args.ridge,
            "label_rates": {
                f"{k}": {"audit_per_window": k, "labels_per_range": k * W, "share_of_frames": k / F}
                for k in rates
            },
            "interval": "95% normal approximation (regressor: +-1.96 x leave-one-family-out RMSE within its training families)",
            "regressor": "fitted per held-out family on clean + the other families (resampling seed 1); "
            "evaluated on ranges of resampling seed 2",
        },
        "regressors": {k: r.as_dict() for k, r in regressors.items()},
        "summary": {g: table(g) for g in ("corrupted", "shift", "clean", *FAMILY_ORDER)},
        "per_condition": per_cond,
    }


def print_tables(r: dict[str, Any]) -> None:
    s = r["setup"]
    print(
        f"\naccuracy estimate: ranges of {s['windows_per_range']} x {s['window_frames']} frames; "
        f"ppi@k / labels_only@k = k uniform audit labels per window (k/{s['window_frames']} of frames); "
        f"CPU flags: {' '.join(r['machine']['cpu_flags']) or '-'}"
    )
    groups = ["corrupted", "shift", "clean", *FAMILY_ORDER]
    names = list(r["summary"]["corrupted"])
    print("MAE in points (coverage of the 95% interval) per group; regressor: family held out")
    print(f"{'estimator':<20}" + "".join(f"{g:>17}" for g in groups))
    for n in names:
        cells = []
        for g in groups:
            c = r["summary"][g][n]
            mae = "-" if c["mae_points"] is None else f"{c['mae_points']:.2f}"
            cov = "" if c["coverage"] is None else f" ({100 * c['coverage']:.0f}%)"
            cells.append(f"{mae + cov:>17}")
        print(f"{n:<20}" + "".join(cells))
    print(
        "mean interval width (points), corrupted: "
        + ", ".join(
            f"{n} {c['mean_width_points']}"
            for n, c in r["summary"]["corrupted"].items()
            if c["mean_width_points"]
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--package", help="existing package (default: the drift benchmark's)")
    ap.add_argument("--frames", type=int, default=250, help="frames per corrupted or shifted condition")
    ap.add_argument("--clean-frames", type=int, default=1500)
    ap.add_argument("--windows", type=int, default=10, help="300-frame windows per range")
    ap.add_argument("--train-ranges", type=int, default=30, help="regressor training ranges per condition")
    ap.add_argument("--eval-ranges", type=int, default=50, help="evaluation ranges per condition")
    ap.add_argument("--label-rates", type=int, nargs="+", default=[1, 3, 10], help="audit frames per window")
    ap.add_argument("--ridge", type=float, default=3.0)
    ap.add_argument("--corruptions", type=int, default=0, help="only the first N corruptions (0: all)")
    ap.add_argument("--quick", action="store_true", help="small smoke run (numbers not comparable)")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_ranges, args.eval_ranges = 5, 5
    t = time.perf_counter()
    result = run(args)
    result["seconds"] = round(time.perf_counter() - t, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_tables(result)
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
