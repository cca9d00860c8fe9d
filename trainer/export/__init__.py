"""The export stage: a trained classifier -> a model package (ONNX and TFLite, fp32 and int8, agreement check, model.json)."""

from trainer.export.package import ALL_FORMATS, ExportError, ExportSpec, export_package, write_manifest
from trainer.export.pretrained import export_pretrained

__all__ = [
    "ALL_FORMATS",
    "export_package",
    "export_pretrained",
    "ExportError",
    "ExportSpec",
    "write_manifest",
]
