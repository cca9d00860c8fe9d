"""Trainer benchmark: training time, fp32 vs int8 accuracy per artifact, ECE before/after temperature
scaling, mean corruption accuracy, and the cost of each corruption.

    python -m bench.train_bench            # writes bench/results/train.json and prints a table
    python -m bench.train_bench --quick    # a small smoke run (not comparable with the targets)

Two training runs on the built-in dataset, sharing one feature cache:

* ``default``: exactly ``edgefleet train --data builtin:shapes`` (480 images, 224-pixel input, all four
  artifacts, robustness on every model): the wall-clock time a user sees on this machine.
* ``calibration``: ``builtin:shapes?n=400`` split 40/30/30, so the temperature is fitted on ~960
  validation images and ECE is measured on ~960 test images. On the default split's ~70 test images the
  ECE estimate alone has a noise floor of several points, far above the 2% target.

Targets (docs/brief): ECE after temperature scaling <= 2% (Guo et al. 2017: CIFAR-10 ResNet-110
4.6% -> 0.83%); int8 top-1 within 1 point of fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "train.json"


def corruption_costs(repeats: int = 10) -> dict[str, float]:
    """Median milliseconds per 320x240 frame of each corruption at severity 3 (one thread of numpy/OpenCV)."""
    from trainer.data.corruptions import CORRUPTIONS, corrupt
    from trainer.data.scenes import Domain, render_frame

    frame = render_frame("star", Domain(), np.random.default_rng(0))
    out = {}
    for name in CORRUPTIONS:
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            corrupt(frame, name, 3, np.random.default_rng(i))
            times.append((time.perf_counter() - t) * 1000)
        out[name] = round(float(np.median(times)), 2)
    return out


def overtrained_head(data: Any, cache_dir: str, epochs: int = 150) -> dict[str, Any]:
    """Temperature scaling where it has work to do: the same features, a head trained without weight decay,
    class balancing or early stopping (the last epoch's weights), which makes it over-confident."""
    from edge_agent.postprocess import to_probabilities
    from trainer.build import TrainConfig, _features
    from trainer.data.augment import AUGMENT_VERSION
    from trainer.evaluation.calibration import fit_temperature
    from trainer.evaluation.metrics import ece, nll
    from trainer.model.backbone import build_classifier, split
    from trainer.model.features import FeatureCache, FeatureExtractor, prefix_fingerprint
    from trainer.model.fit import FitConfig, fit_suffix, predict_logits

    cfg = TrainConfig()
    spec = cfg.preprocess()
    prefix, suffix = split(build_classifier(len(data.labels), 0), 0)
    extractor = FeatureExtractor(prefix, spec)
    cache = FeatureCache(prefix_fingerprint(0, spec, f"{AUGMENT_VERSION}:seed0"), cache_dir)
    tr, va, te = data.split("train"), data.split("val"), data.split("test")
    x_tr, x_va, x_te = (
        _features(extractor, cache, s, v, 0, False) for s, v in ((tr, cfg.aug_views), (va, 0), (te, 0))
    )
    y_va, y_te = data.index(va), data.index(te)
    fit = FitConfig(
        epochs=epochs, patience=epochs, lr=1e-2, weight_decay=0.0, balance=False, restore_best=False
    )
    t = time.perf_counter()
    fit_suffix(
        suffix,
        x_tr,
        np.repeat(data.index(tr), cfg.aug_views + 1),
        x_va,
        y_va,
        fit,
        num_classes=len(data.labels),
        progress=False,
    )
    seconds = time.perf_counter() - t
    lv, lt = predict_logits(suffix, x_va), predict_logits(suffix, x_te)
    temp = fit_temperature(lv, y_va)
    before, after = (
        to_probabilities(lt, "logits", 1.0).astype(np.float64),
        to_probabilities(lt, "logits", temp).astype(np.float64),
    )
    return {
        "setup": f"head only, {epochs} epochs, lr 1e-2, no weight decay, no early stopping",
        "train_s": round(seconds, 1),
        "test_images": len(y_te),
        "test_accuracy": float((lt.argmax(1) == y_te).mean()),
        "temperature": temp,
        "ece_before": ece(before, y_te),
        "ece_after": ece(after, y_te),
        "nll_before": nll(before, y_te),
        "nll_after": nll(after, y_te),
    }


def shifted_domains(package_root: Path, per_class: int = 30) -> dict[str, float]:
    """Device-artifact accuracy of a package trained on the base domains, on each named shift."""
    from edge_agent.package import load_package
    from trainer.data import builtin_dataset
    from trainer.evaluation.runners import evaluate_package

    pkg = load_package(package_root)
    device = pkg.manifest.reference.artifact if pkg.manifest.reference else next(iter(pkg.manifest.artifacts))
    shifts = {
        "base (fresh seed)": "",
        "lighting=night": "&lighting=night",
        "lighting=glare": "&lighting=glare",
        "background=clutter": "&background=clutter",
        "background=tiles": "&background=tiles",
        "sensor=noisy": "&sensor=noisy",
        "sensor=soft": "&sensor=soft",
        "sensor=lowres": "&sensor=lowres",
    }
    out = {}
    for name, query in shifts.items():
        data = builtin_dataset(f"builtin:shapes?n={per_class}&seed=99{query}")
        ev = evaluate_package(pkg, data, split="all", artifacts=[device])
        out[name] = ev["models"][device]["accuracy"]
    return out


def summarize(ev: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The numbers of one training run (from the evaluation written into model.json)."""
    rob = ev.get("robustness", {}).get("models", {})
    cal = ev["calibration"]
    data = ev["dataset"]["per_split"]
    return {
        "dataset": ev["dataset"]["origin"],
        "images": {s: sum(v.values()) for s, v in data.items()},
        "time_s": {k.removesuffix("_s"): round(v, 1) for k, v in timings.items()},
        "epochs_run": ev["training"]["epochs_run"],
        "best_epoch": ev["training"]["best_epoch"],
        "models": {
            key: {
                "test_accuracy": r["accuracy"],
                "heldout_accuracy": ev["heldout_accuracy"][key],
                "macro_f1": r["macro_f1"],
                "ece": r["ece"],
                "mean_corruption_accuracy": rob.get(key, {}).get("mean_corruption_accuracy"),
            }
            for key, r in ev["models"].items()
        },
        "int8_minus_fp32_points": ev.get("int8_minus_fp32_points", {}),
        "calibration": {
            "temperature": cal["temperature"],
            "val_images": cal["fit_images"],
            "test_images": ev["models"]["torch-fp32"]["images"],
            "ece_before": cal["test"]["ece_before"],
            "ece_after": cal["test"]["ece_after"],
            "nll_before": cal["test"]["nll_before"],
            "nll_after": cal["test"]["nll_after"],
        },
        "robustness_images": ev.get("robustness", {}).get("images"),
        "reference": ev["reference_data"],
        "gate_passed": ev["gate"]["passed"],
        "gate": [
            f"{'pass' if r['passed'] else 'FAIL'} {r['rule']}: {r['detail']}" for r in ev["gate"]["rules"]
        ],
    }


def print_table(results: dict[str, Any]) -> None:
    for name, run in results["runs"].items():
        imgs = run["images"]
        print(
            f"\n== {name}: {run['dataset']}  (train {imgs['train']} / val {imgs['val']} / test {imgs['test']})"
        )
        t = run["time_s"]
        print(
            f"   time on {results['machine']['cpus']} cores: features {t['features']} s, training {t['train']} s "
            f"({run['epochs_run']} epochs), evaluation {t.get('evaluate', '-')} s, total {t['total']} s"
            + ("" if run["gate_passed"] else "  (gate FAILED: no package)")
        )
        print(
            f"   {'model':12s} {'test acc':>9s} {'held-out':>9s} {'macro F1':>9s} {'ECE':>7s} {'mean corr.':>10s}"
        )
        for key, m in run["models"].items():
            mca = m["mean_corruption_accuracy"]
            print(
                f"   {key:12s} {m['test_accuracy']:9.2%} {m['heldout_accuracy']:9.2%} {m['macro_f1']:9.2%} {m['ece']:7.2%} "
                f"{(f'{mca:.2%}' if mca is not None else '-'):>10s}"
            )
        c = run["calibration"]
        print(
            f"   temperature {c['temperature']:.3f} (fitted on {c['val_images']} val images): torch fp32 test ECE "
            f"{c['ece_before']:.2%} -> {c['ece_after']:.2%} on {c['test_images']} images (target <= 2%)"
        )
        if "shifted_domains" in run:
            print(
                "   device artifact under domain shifts (never trained on): "
                + ", ".join(f"{k} {v:.1%}" for k, v in run["shifted_domains"].items())
            )
        print(
            "   int8 minus torch fp32, held-out accuracy (points): "
            + ", ".join(f"{k} {v:+.2f}" for k, v in run["int8_minus_fp32_points"].items())
        )
    if "overtrained_head" in results:
        o = results["overtrained_head"]
        print(
            f"\n== over-trained head ({o['setup']}): test accuracy {o['test_accuracy']:.2%}, temperature "
            f"{o['temperature']:.3f}: ECE {o['ece_before']:.2%} -> {o['ece_after']:.2%}, NLL {o['nll_before']:.3f} -> "
            f"{o['nll_after']:.3f} on {o['test_images']} test images"
        )
    print(
        "\ncorruption cost per 320x240 frame (ms, severity 3): "
        + ", ".join(f"{k} {v}" for k, v in results["corruption_ms"].items())
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help="small smoke run (numbers not comparable)")
    args = parser.parse_args(argv)

    import logging

    logging.getLogger().setLevel(logging.WARNING)
    from trainer.build import RobustnessConfig, TrainConfig, train_package
    from trainer.data import builtin_dataset, load_dataset
    from trainer.errors import GateError

    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "quick": args.quick,
        "corruption_ms": corruption_costs(),
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        cache = str(Path(tmp) / "features")
        if args.quick:
            runs = {
                "default": (
                    load_dataset("builtin:shapes?n=24"),
                    TrainConfig(
                        input_size=128,
                        feature_cache=cache,
                        progress=False,
                        robustness=RobustnessConfig(images=16, corruptions=["gaussian_noise", "fog"]),
                    ),
                ),
            }
        else:
            runs = {
                "default": (load_dataset("builtin:shapes"), TrainConfig(feature_cache=cache, progress=False)),
                "calibration": (
                    builtin_dataset("builtin:shapes?n=400", fractions=(0.4, 0.3, 0.3)),
                    TrainConfig(
                        feature_cache=cache,
                        progress=False,
                        robustness=RobustnessConfig(images=80, models="device"),
                    ),
                ),
            }
        for name, (data, config) in runs.items():
            t = time.perf_counter()
            try:
                result = train_package(data, Path(tmp) / name, config)
                results["runs"][name] = summarize(result.evaluation.model_dump(mode="json"), result.timings)
                if name == "calibration":
                    results["runs"][name]["shifted_domains"] = shifted_domains(result.package.root)
            except GateError as exc:  # the numbers are still measured; the run just produced no package
                assert exc.evaluation is not None
                results["runs"][name] = summarize(
                    exc.evaluation.model_dump(mode="json"), exc.evaluation.timings_s
                )
            print(
                f"[train-bench] {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True
            )
        if "calibration" in runs:
            results["overtrained_head"] = overtrained_head(runs["calibration"][0], cache)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
