"""``edgefleet model ...``: package the pretrained model, inspect a package."""

from __future__ import annotations

import argparse
import sys


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
