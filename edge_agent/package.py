"""The model package: the contract between the trainer and the agent.

A package is a directory with ``model.json`` and the files it lists (ONNX and TFLite artifacts, golden
inputs). ``model.json`` records the labels, the preprocessing spec, each artifact's input/output
tensor spec, the sha256 and size of every file, golden inputs with their expected top-1, and the
telemetry bin edges; the trainer adds evaluation results and the drift reference to it. The package's
identity is the sha256 of ``model.json``, which covers every file through their hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.errors import PackageError
from edge_agent.package_evaluation import Evaluation
from edge_agent.protocol import ModelRef
from edge_agent.reference import ReferenceStats

FORMAT = "edgefleet.model/1"
MANIFEST = "model.json"


class PreprocessSpec(BaseModel):
    """How a camera frame becomes a model input; shared by the agent and the trainer."""

    model_config = ConfigDict(extra="forbid")
    size: tuple[int, int] = (224, 224)
    """Model input (height, width)."""
    resize: Literal["center_crop", "squash", "letterbox"] = "center_crop"
    """center_crop keeps the aspect ratio and crops the largest centred region of the input's aspect;
    squash resizes the whole frame ignoring aspect; letterbox pads with ``pad_value``."""
    crop_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    """For center_crop: fraction of the frame's shorter side kept around the centre."""
    interpolation: Literal["area", "linear", "cubic"] = "area"
    color: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    """Per-channel mean in 0..255 pixel units (in ``color`` order)."""
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    pad_value: int = Field(default=0, ge=0, le=255)


class TensorSpec(BaseModel):
    """One runtime tensor: layout, element type and, for integer tensors, the affine quantization."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    layout: Literal["NCHW", "NHWC", "NC"] = "NCHW"
    dtype: Literal["float32", "int8", "uint8"] = "float32"
    scale: float | None = None
    zero_point: int | None = None

    @model_validator(mode="after")
    def _quantized_needs_params(self) -> TensorSpec:
        if self.dtype != "float32" and (self.scale is None or self.zero_point is None):
            raise ValueError(f"{self.dtype} tensor needs scale and zero_point")
        return self


class Artifact(BaseModel):
    """One runnable file of the package."""

    model_config = ConfigDict(extra="forbid")
    file: str
    runtime: Literal["onnxruntime", "litert"]
    precision: Literal["fp32", "int8"]
    input: TensorSpec
    output: TensorSpec
    quantization: dict[str, Any] | None = None
    top1_agreement: float | None = None
    """Share of the check images whose top-1 equals torch fp32's (written by the export)."""
    top1_agreement_confident: float | None = None
    """The same, on the check images where torch fp32 is at least 50% confident."""
    agreement_images: int | None = None
    check_agreement: float | None = None
    """Top-1 agreement with the fp32 reference on the package's agreement check, measured at export."""


class AgreementCheck(BaseModel):
    """Inputs with their fp32 reference outputs, so a device can tell on its own CPU whether an artifact
    computes what the model computes (int8 kernels differ by CPU: ONNX Runtime's u8s8 path saturates
    without VNNI). ``file`` is an ``.npz`` with ``images`` (uint8, N x H x W x 3, model size and colour
    order, i.e. after the package's resize) and ``probabilities`` (float32, N x classes, torch fp32 with
    the package temperature)."""

    model_config = ConfigDict(extra="forbid")
    file: str
    count: int = Field(ge=1)
    floor: float = Field(gt=0.0, le=1.0)
    """An artifact whose top-1 agrees with the reference on fewer than this share of the inputs is not
    eligible to serve, whatever its speed."""
    low_confidence: int = Field(default=0, ge=0)
    """How many of the inputs the fp32 model is less than 50% confident on (the sensitive ones)."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class GoldenInput(BaseModel):
    """A frame (image file) whose top-1 every artifact must reproduce in a self-test."""

    model_config = ConfigDict(extra="forbid")
    file: str
    expected_top1: int
    expected_label: str | None = None


class ModelManifest(BaseModel):
    """Schema of model.json."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["edgefleet.model/1"] = "edgefleet.model/1"
    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=32)
    created: str
    task: Literal["image-classification"] = "image-classification"
    labels: list[str] = Field(min_length=2)
    preprocess: PreprocessSpec
    output_kind: Literal["logits", "probabilities"] = "logits"
    temperature: float = Field(default=1.0, gt=0.0)
    """Softmax temperature fitted on validation data (1.0 = uncalibrated)."""
    artifacts: dict[str, Artifact] = Field(min_length=1)
    golden: list[GoldenInput] = Field(default_factory=list)
    agreement_check: AgreementCheck | None = None
    files: dict[str, FileEntry]
    telemetry_edges: dict[str, list[float]]
    reference: ReferenceStats | None = None
    """Drift baseline computed by the trainer (reference histograms, class prior, ATC threshold)."""
    evaluation: Evaluation | None = None
    """What the trainer measured (see :mod:`edge_agent.package_evaluation`); absent for packaged pretrained models."""
    provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references_exist(self) -> ModelManifest:
        if self.evaluation is not None and self.evaluation.device_artifact not in self.evaluation.models:
            raise ValueError(
                f"evaluation: no test report for the device artifact {self.evaluation.device_artifact!r}"
            )
        for key, art in self.artifacts.items():
            if art.file not in self.files:
                raise ValueError(f"artifact {key!r} refers to {art.file!r}, which is not listed in files")
        if self.agreement_check is not None and self.agreement_check.file not in self.files:
            raise ValueError(f"agreement check {self.agreement_check.file!r} is not listed in files")
        for g in self.golden:
            if g.file not in self.files:
                raise ValueError(f"golden input {g.file!r} is not listed in files")
            if not 0 <= g.expected_top1 < len(self.labels):
                raise ValueError(f"golden input {g.file!r}: expected_top1 {g.expected_top1} out of range")
        return self


class ModelPackage:
    """A loaded, verified package: its directory, manifest and identity."""

    def __init__(self, root: Path, manifest: ModelManifest, sha256: str) -> None:
        self.root = root
        self.manifest = manifest
        self.sha256 = sha256

    def path(self, name: str) -> Path:
        return self.root / name

    def artifact_path(self, key: str) -> Path:
        return self.root / self.manifest.artifacts[key].file

    def ref(self, artifact: str | None = None) -> ModelRef:
        return ModelRef(
            name=self.manifest.name, version=self.manifest.version, sha256=self.sha256, artifact=artifact
        )

    def __repr__(self) -> str:
        return f"ModelPackage({self.manifest.name} {self.manifest.version} at {self.root})"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_package(root: str | Path, verify: bool = True) -> ModelPackage:
    """Load ``root/model.json`` and check every listed file's size and sha256.

    Raises :class:`PackageError` naming the path and the failed check.
    """
    root = Path(root)
    if not root.is_dir():
        raise PackageError(f"{root}: model package directory does not exist")
    manifest_path = root / MANIFEST
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{manifest_path}: missing (not a model package)") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{manifest_path}: not valid JSON ({exc})") from None
    try:
        manifest = ModelManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise PackageError(f"{manifest_path}: field {loc}: {first['msg']}") from None
    if verify:
        for name, entry in manifest.files.items():
            p = root / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise PackageError(f"{manifest_path}: file entry {name!r} escapes the package directory")
            if not p.is_file():
                raise PackageError(f"{p}: listed in model.json but missing")
            size = p.stat().st_size
            if size != entry.size:
                raise PackageError(f"{p}: size {size} does not match model.json ({entry.size})")
            digest = sha256_file(p)
            if digest != entry.sha256:
                raise PackageError(
                    f"{p}: sha256 {digest[:12]}... does not match model.json ({entry.sha256[:12]}...)"
                )
    return ModelPackage(root, manifest, hashlib.sha256(raw).hexdigest())
