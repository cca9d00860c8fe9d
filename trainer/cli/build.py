"""``edgefleet train``: build a gated model package from a dataset (see :mod:`trainer.build`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trainer.cli.eval import print_models


# -- training ------------------------------------------------------------------------------------
def register_train(sub: argparse._SubParsersAction) -> None:
    """``edgefleet train``: train, calibrate, evaluate, gate, export and write the model card."""
    p = sub.add_parser("train", help="train a classifier package (transfer learning from EfficientNet-Lite0)")
    p.add_argument("--data", required=True, help="ImageFolder directory or builtin:NAME[?options]")
    p.add_argument("--out", required=True, help="package directory to create")
    p.add_argument("--champion", help="current package: the gate compares the candidate with it")
    p.add_argument("--config", help="YAML/JSON TrainConfig (flags override it)")
    p.add_argument("--name")
    p.add_argument("--version")
    p.add_argument("--epochs", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--unfreeze", type=int, dest="unfreeze_blocks", help="also train the last N blocks (0 = head only)"
    )
    p.add_argument("--aug-views", type=int, help="augmented views per training image")
    p.add_argument("--input-size", type=int, help="model input side in pixels (multiple of 32)")
    p.add_argument("--formats", help="comma-separated: onnx-fp32,onnx-int8,tflite-fp32,tflite-int8")
    p.add_argument("--device-artifact", help="artifact devices run (reference + gate); default: first int8")
    p.add_argument("--no-robustness", action="store_true", help="skip the corruption benchmark")
    p.add_argument("--robustness-images", type=int)
    p.add_argument("--corruptions", help="comma-separated subset of the corruptions")
    p.add_argument("--max-ece", type=float, help="gate: ECE limit (0..1); negative disables")
    p.add_argument("--max-int8-drop", type=float, help="gate: points int8 may lose against fp32")
    p.add_argument(
        "--max-slice-drop", type=float, help="gate: points any slice may lose against the champion"
    )
    p.add_argument(
        "--max-accuracy-drop", type=float, help="gate: points overall accuracy may lose against the champion"
    )
    p.add_argument("--min-accuracy", type=float, help="gate: minimum test accuracy (0..1)")
    p.add_argument(
        "--require-gain",
        action="append",
        default=[],
        metavar="KEY=VALUE:POINTS",
        help="gate: the candidate must beat the champion on this slice by POINTS (repeatable)",
    )
    p.add_argument(
        "--licence", default="unspecified", help="licence/consent tag for untagged images of a directory"
    )
    p.add_argument("--feature-cache", help="directory to keep backbone features between runs")
    p.add_argument("--checkpoint-dir", help="write best.pt/last.pt here (and resume from last.pt)")
    p.add_argument("--threads", type=int)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_train)


def _train_config(args: argparse.Namespace) -> Any:
    from edge_agent.config_files import read_yaml, validate_model
    from trainer.build import TrainConfig

    cfg = (
        validate_model(TrainConfig, read_yaml(args.config) or {}, args.config)
        if args.config
        else TrainConfig()
    )
    top = {
        k: getattr(args, k)
        for k in (
            "name",
            "version",
            "unfreeze_blocks",
            "aug_views",
            "input_size",
            "device_artifact",
            "threads",
        )
    }
    update = {k: v for k, v in top.items() if v is not None}
    fit = {k: getattr(args, k) for k in ("epochs", "patience", "lr", "seed") if getattr(args, k) is not None}
    if fit:
        update["fit"] = cfg.fit.model_copy(update=fit)
    if args.formats:
        update["formats"] = [f.strip() for f in args.formats.split(",") if f.strip()]
    rob: dict[str, Any] = {}
    if args.no_robustness:
        rob["enabled"] = False
    if args.robustness_images:
        rob["images"] = args.robustness_images
    if args.corruptions:
        rob["corruptions"] = [c.strip() for c in args.corruptions.split(",") if c.strip()]
    if rob:
        update["robustness"] = cfg.robustness.model_copy(update=rob)
    gate = {}
    for flag in ("max_ece", "max_int8_drop", "max_slice_drop", "max_accuracy_drop", "min_accuracy"):
        v = getattr(args, flag)
        if v is not None:
            gate[flag] = None if v < 0 else v
    if args.require_gain:
        gains = dict(cfg.gate.min_slice_gain)
        for item in args.require_gain:
            key, _, pts = item.rpartition(":")
            gains[key] = float(pts)
        gate["min_slice_gain"] = gains
    if gate:
        update["gate"] = cfg.gate.model_copy(update=gate)
    for k in ("feature_cache", "checkpoint_dir"):
        if getattr(args, k):
            update[k] = getattr(args, k)
    if args.quiet:
        update["progress"] = False
    return TrainConfig.model_validate(
        {
            **cfg.model_dump(),
            **{k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in update.items()},
        }
    )


def _train(args: argparse.Namespace) -> int:
    import logging

    from trainer.build import train_package
    from trainer.data import load_dataset
    from trainer.errors import GateError
    from trainer.export.package import ExportError

    if not args.verbose:  # the quantizers log every rescaled bias at INFO
        logging.getLogger().setLevel(logging.WARNING)
    config = _train_config(args)
    data = load_dataset(args.data, licence=args.licence)
    try:
        result = train_package(data, args.out, config, champion=args.champion, overwrite=args.overwrite)
    except GateError as exc:
        print(f"gate FAILED; no package written to {args.out}")
        _print_gate(exc.evaluation.model_dump(mode="json") if exc.evaluation else {})
        return 3
    except ExportError as exc:
        print(f"edgefleet: error: {exc}", file=sys.stderr)
        return 2
    pkg = result.package
    ev = result.evaluation.model_dump(mode="json")
    print(
        f"wrote {pkg.root} ({pkg.manifest.name} {pkg.manifest.version}, sha256 {pkg.sha256[:12]}), card: {pkg.root / 'card.html'}"
    )
    print_models(ev)
    cal = ev["calibration"]
    print(
        f"temperature {cal['temperature']:.3f} (fitted on val): test ECE {cal['test']['ece_before']:.2%} -> {cal['test']['ece_after']:.2%}"
    )
    ref = result.reference
    print(
        f"drift reference: {ref.images} held-out images via {ref.artifact}, ATC threshold {ref.atc_threshold:.4f}, accuracy {ref.accuracy:.1%}"
    )
    _print_gate(ev)
    t = result.timings
    print(
        f"time: features {t['features_s']:.1f} s, training {t['train_s']:.1f} s, export+evaluation {t['export_total_s']:.1f} s, total {t['total_s']:.1f} s"
    )
    print(f"check it: edgefleet agent selftest --package {pkg.root}")
    return 0


def _print_gate(ev: dict[str, Any]) -> None:
    for r in (ev.get("gate") or {}).get("rules", []):
        print(f"  gate {'pass' if r['passed'] else 'FAIL'}  {r['rule']}: {r['detail']}")
