"""Trainer command groups, registered into the ``edgefleet`` CLI as entry-point plugins.

Each ``register_*`` adds one group to the argparse subparsers; heavy imports (torch) happen only
inside the handlers, so ``edgefleet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register_model(sub: argparse._SubParsersAction) -> None:
    """``edgefleet model ...``: build and inspect model packages."""
    p = sub.add_parser("model", help="build and inspect model packages")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    e = msub.add_parser("export-pretrained", help="package the ImageNet-pretrained EfficientNet-Lite0")
    e.add_argument("--out", required=True, help="package directory to create")
    e.add_argument("--version", default="1.0.0")
    e.add_argument("--calibration", type=int, default=128, help="number of calibration frames")
    e.add_argument("--formats", default="onnx-fp32,onnx-int8,tflite-fp32,tflite-int8")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_export_pretrained)
    i = msub.add_parser("inspect", help="verify a package and print its manifest summary")
    i.add_argument("package")
    i.set_defaults(func=_inspect)


def _export_pretrained(args: argparse.Namespace) -> int:
    from trainer.export.pretrained import export_pretrained

    report = export_pretrained(
        args.out,
        version=args.version,
        calibration_count=args.calibration,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        overwrite=args.overwrite,
    )
    pkg = report.package
    print(f"wrote {pkg.root} ({pkg.manifest.name} {pkg.manifest.version}, sha256 {pkg.sha256[:12]})")
    for key, art in pkg.manifest.artifacts.items():
        print(f"  {key:12s} {art.file:20s} top-1 agreement with torch fp32: {art.top1_agreement:.1%}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from edge_agent.package import load_package

    pkg = load_package(args.package)
    m = pkg.manifest
    print(f"{m.name} {m.version}  sha256 {pkg.sha256}")
    print(f"  labels: {len(m.labels)}  preprocess: {m.preprocess.model_dump()}")
    for key, art in m.artifacts.items():
        size = m.files[art.file].size
        print(
            f"  {key:12s} {art.runtime:12s} {art.precision:5s} {size / 1e6:6.1f} MB  agreement {art.top1_agreement}"
        )
    print(f"  golden: {[g.expected_label for g in m.golden]}")
    sys.stdout.flush()
    return 0


# -- datasets ------------------------------------------------------------------------------------
def register_data(sub: argparse._SubParsersAction) -> None:
    """``edgefleet data ...``: check, generate and describe datasets."""
    p = sub.add_parser("data", help="check, generate and describe training datasets")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    c = dsub.add_parser("check", help="find corrupt files, leakage, imbalance and likely label errors")
    c.add_argument("data", help="ImageFolder directory or builtin:NAME")
    c.add_argument(
        "--package", help="current model package for the label-error check (default: a linear probe)"
    )
    c.add_argument("--min-class-images", type=int, default=10)
    c.add_argument(
        "--disagreement", type=float, default=0.9, help="model confidence that flags a label (0..1)"
    )
    c.add_argument("--no-label-check", action="store_true")
    c.add_argument("--strict", action="store_true", help="warnings fail the check too")
    c.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    c.set_defaults(func=_data_check)
    g = dsub.add_parser("generate", help="write a built-in dataset as an ImageFolder directory")
    g.add_argument("data", help="builtin:shapes[?n=..&seed=..&lighting=..&background=..&sensor=..]")
    g.add_argument("--out", required=True)
    g.set_defaults(func=_data_generate)
    m = dsub.add_parser("manifest", help="print a dataset's manifest summary (and write the manifest)")
    m.add_argument("data")
    m.add_argument("--out", help="write the full manifest (per image sha256, split, source, licence) here")
    m.add_argument(
        "--licence", default="unspecified", help="licence/consent tag for images metadata.csv does not tag"
    )
    m.set_defaults(func=_data_manifest)


def _data_check(args: argparse.Namespace) -> int:
    import json

    from edge_agent.package import load_package
    from trainer.data import load_dataset
    from trainer.data.check import check_dataset

    report = check_dataset(
        load_dataset(args.data),
        package=load_package(args.package) if args.package else None,
        min_class_images=args.min_class_images,
        disagreement=args.disagreement,
        label_check=not args.no_label_check,
    )
    print(report.to_text())
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report.as_dict(), f, indent=1)
    return 1 if report.failed(args.strict) else 0


def _data_generate(args: argparse.Namespace) -> int:
    from trainer.data import builtin_dataset, write_imagefolder

    ds = builtin_dataset(args.data)
    out = write_imagefolder(ds, args.out)
    print(
        f"wrote {len(ds.samples)} images of {len(ds.labels)} classes to {out} (metadata.csv has the domains)"
    )
    return 0


def _data_manifest(args: argparse.Namespace) -> int:
    import json

    from trainer.data import load_dataset

    ds = load_dataset(args.data, licence=args.licence)
    manifest = ds.manifest()
    print(json.dumps(manifest.summary(), indent=1))
    if args.out:
        with open(args.out, "w") as f:
            f.write(manifest.model_dump_json(indent=1))
        print(f"wrote {args.out}")
    return 0


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
    from pathlib import Path

    import yaml

    from trainer.build import TrainConfig

    base = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    cfg = TrainConfig.model_validate(base or {})
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
        _print_gate(exc.evaluation or {})
        return 3
    except ExportError as exc:
        print(f"edgefleet: error: {exc}", file=sys.stderr)
        return 2
    pkg = result.package
    ev = result.evaluation
    print(
        f"wrote {pkg.root} ({pkg.manifest.name} {pkg.manifest.version}, sha256 {pkg.sha256[:12]}), card: {pkg.root / 'card.html'}"
    )
    _print_models(ev)
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


def _print_models(ev: dict[str, Any]) -> None:
    rob = ev.get("robustness") or {}
    held = ev.get("heldout_accuracy", {})
    print(f"  {'model':12s} {'accuracy':>9s} {'macro F1':>9s} {'ECE':>7s} {'held-out':>9s} {'corrupted':>9s}")
    for key, r in ev["models"].items():
        mca = rob.get("models", {}).get(key, {}).get("mean_corruption_accuracy")
        print(
            f"  {key:12s} {r['accuracy']:9.1%} {r['macro_f1']:9.1%} {r['ece']:7.2%} "
            f"{(f'{held[key]:.1%}' if key in held else '-'):>9s} {(f'{mca:.1%}' if mca is not None else '-'):>9s}"
        )


def _print_gate(ev: dict[str, Any]) -> None:
    for r in (ev.get("gate") or {}).get("rules", []):
        print(f"  gate {'pass' if r['passed'] else 'FAIL'}  {r['rule']}: {r['detail']}")


# -- evaluation ----------------------------------------------------------------------------------
def register_eval(sub: argparse._SubParsersAction) -> None:
    """``edgefleet eval``: evaluate a package's artifacts on labelled data."""
    p = sub.add_parser("eval", help="evaluate every artifact of a package on labelled data")
    p.add_argument("--package", required=True)
    p.add_argument("--data", required=True, help="ImageFolder directory or builtin:NAME[?options]")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--artifacts", help="comma-separated subset (default: all)")
    p.add_argument(
        "--corruptions",
        nargs="?",
        const="all",
        help="also measure robustness (all, or a comma-separated list)",
    )
    p.add_argument("--robustness-images", type=int, default=40)
    p.add_argument("--json", dest="json_out", help="write the full evaluation here")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    import json

    from edge_agent.package import load_package
    from trainer.data import load_dataset
    from trainer.data.corruptions import CORRUPTIONS
    from trainer.evaluation.runners import evaluate_package

    pkg = load_package(args.package)
    corruptions = None
    if args.corruptions:
        corruptions = (
            list(CORRUPTIONS)
            if args.corruptions == "all"
            else [c.strip() for c in args.corruptions.split(",")]
        )
        unknown = [c for c in corruptions if c not in CORRUPTIONS]
        if unknown:
            print(
                f"edgefleet: error: unknown corruption(s) {unknown} (known: {', '.join(CORRUPTIONS)})",
                file=sys.stderr,
            )
            return 2
    ev = evaluate_package(
        pkg,
        load_dataset(args.data),
        split=args.split,
        artifacts=args.artifacts.split(",") if args.artifacts else None,
        corruptions=corruptions,
        robustness_images=args.robustness_images,
        threads=args.threads,
        progress=True,
    )
    print(
        f"{pkg.manifest.name} {pkg.manifest.version} on {ev['data']} ({ev['split']} split, {ev['images']} images)"
    )
    _print_models(ev)
    for key, r in ev["models"].items():
        for sk, vals in r["slices"].items():
            print(
                f"  {key} by {sk}: "
                + ", ".join(f"{v} {s['accuracy']:.0%} (n={s['images']})" for v, s in vals.items())
            )
    if "robustness" in ev:
        rob = ev["robustness"]
        for key, m in rob["models"].items():
            worst = min(m["accuracy"].items(), key=lambda kv: kv[1][-1])
            print(
                f"  {key}: mean corruption accuracy {m['mean_corruption_accuracy']:.1%}, worst at severity 5: {worst[0]} {worst[1][-1]:.0%}"
            )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(ev, f, indent=1)
    return 0
