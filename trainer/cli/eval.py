"""``edgefleet eval``: evaluate a model package on a labelled dataset."""

from __future__ import annotations

import argparse
import sys
from typing import Any


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
    print_models(ev)
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


def print_models(ev: dict[str, Any]) -> None:
    rob = ev.get("robustness") or {}
    held = ev.get("heldout_accuracy", {})
    print(f"  {'model':12s} {'accuracy':>9s} {'macro F1':>9s} {'ECE':>7s} {'held-out':>9s} {'corrupted':>9s}")
    for key, r in ev["models"].items():
        mca = rob.get("models", {}).get(key, {}).get("mean_corruption_accuracy")
        print(
            f"  {key:12s} {r['accuracy']:9.1%} {r['macro_f1']:9.1%} {r['ece']:7.2%} "
            f"{(f'{held[key]:.1%}' if key in held else '-'):>9s} {(f'{mca:.1%}' if mca is not None else '-'):>9s}"
        )
