"""``edgefleet data ...``: check, generate and describe datasets."""

from __future__ import annotations

import argparse


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
    from trainer.evaluation.data_check import check_dataset

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
