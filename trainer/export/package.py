"""Export a PyTorch classifier into a model package: ONNX fp32/int8, TFLite fp32/int8 and model.json.

:func:`export_package` is the one export path: the pretrained EfficientNet-Lite0 and every model the
trainer trains go through it. It

1. exports ONNX fp32 (dynamic batch) and quantizes it with onnxruntime static quantization (QDQ,
   uint8 activations, per-channel int8 weights, MinMax calibration on augmented views of the
   calibration frames);
2. converts the model with litert-torch (channel-last input) to TFLite fp32 and quantizes it with
   ai-edge-quantizer (static int8 weights and activations, int8 input and output tensors);
3. runs every artifact through the agent's own preprocessing and runtime backends on check frames
   and records its top-1 agreement with torch fp32;
4. picks golden inputs that every artifact classifies like torch, hashes every file and writes
   model.json last; the package appears under ``out_dir`` by an atomic rename, so a failed export
   leaves nothing half-written behind.

Why these quantization settings: see docs/quantization.md (signed int8 activations in QDQ run ~1.7x
slower than uint8 in onnxruntime's x86 kernels; the input range of the TFLite model is fixed to the
exact normalisation range instead of the calibration's moving average, which clipped bright pixels).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from edge_agent.agreement import load_check, measure_agreement
from edge_agent.backends import BackendOptions, load_backend
from edge_agent.files import write_atomic
from edge_agent.package import (
    MANIFEST,
    AgreementCheck,
    Artifact,
    FileEntry,
    GoldenInput,
    ModelManifest,
    ModelPackage,
    PreprocessSpec,
    TensorSpec,
    load_package,
    sha256_file,
)
from edge_agent.postprocess import to_probabilities
from edge_agent.preprocess import Preprocessor, fit_frame
from edge_agent.telemetry.histogram import default_edges
from trainer.data.quant_frames import augmented_views
from trainer.errors import ExportError
from trainer.export.onnx import export_onnx_fp32, quantize_onnx_int8
from trainer.export.tflite import convert_tflite, quantize_tflite_int8, tflite_tensor_specs
from trainer.ops.progress import Steps

ALL_FORMATS = ("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8")


@dataclass
class ExportSpec:
    """What the package says about the model beyond its weights."""

    name: str
    version: str
    labels: list[str]
    preprocess: PreprocessSpec
    output_kind: str = "logits"
    temperature: float = 1.0
    formats: Sequence[str] = ALL_FORMATS
    golden_count: int = 4
    check_count: int = 40
    """Inputs of the agreement check devices run on every artifact (at least 32; half low-confidence)."""
    calibration_views: int = 512
    """ONNX Runtime's int8 ranges come from this many augmented views of the calibration frames (light,
    blur, noise, scale; :func:`trainer.data.quant_frames.augmented_views`): on the AVX2 kernels they
    agreed better than the plain frames. TFLite's come from the frames themselves: with absolute
    min/max the views' wider ranges agreed 1-2 points worse (bench/int8_search.py, docs/quantization.md)."""
    calibration_seed: int = 0
    agreement_allowance: float = 0.10
    """The package's agreement floor is the best int8 artifact's agreement on the check here minus this
    (about two binomial standard errors on 40 inputs): a device serves no artifact below it."""
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportReport:
    """The published package and each artifact's top-1 agreement with torch fp32 on the check frames
    (all of them, and those where torch is at least 50% confident)."""

    package: ModelPackage
    agreement: dict[str, float]
    decisive_agreement: dict[str, float]


def _float_nchw(frames: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    pre = Preprocessor(spec, TensorSpec(layout="NCHW", dtype="float32"))
    return np.concatenate([pre(f)[0] for f in frames])


def _torch_logits(model: torch.nn.Module, x: np.ndarray, batch: int = 32) -> np.ndarray:
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(x[i : i + batch])).float().numpy())
    return np.concatenate(outs)


def _artifact_top1(
    pkg: ModelPackage, key: str, frames: Sequence[np.ndarray], output_kind: str, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    art = pkg.manifest.artifacts[key]
    backend = load_backend(pkg, key, BackendOptions(threads=max(1, os.cpu_count() or 1)))
    pre = Preprocessor(pkg.manifest.preprocess, art.input)
    probs = [to_probabilities(backend.run(pre(f)[0]), output_kind, temperature)[0] for f in frames]
    backend.close()
    p = np.stack(probs)
    return p.argmax(1), p.max(1)


def _hash_files(root: Path) -> dict[str, FileEntry]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(root).as_posix()] = FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
    return files


def write_manifest(root: Path, manifest: ModelManifest) -> None:
    """Write model.json atomically (temp file, fsync, rename, fsync the directory)."""
    write_atomic(root / MANIFEST, json.dumps(manifest.model_dump(mode="json", exclude_none=True), indent=1))


@dataclass(frozen=True)
class TorchReference:
    """Torch fp32 on the calibration and check frames: what every artifact is measured against."""

    calibration: np.ndarray
    """Calibration frames as NCHW float, preprocessed like the device does (TFLite's ranges)."""
    calibration_views: np.ndarray
    """Augmented views of the calibration frames as NCHW float (ONNX Runtime's ranges)."""
    check: np.ndarray
    """Check frames as NCHW float."""
    probabilities: np.ndarray
    """Torch fp32 probabilities on the check frames."""

    @property
    def top1(self) -> np.ndarray:
        return self.probabilities.argmax(1)


@dataclass(frozen=True)
class RuntimeExporter:
    """How one runtime's artifacts are made: an fp32 export and an int8 quantizer of it."""

    name: str
    fp32_file: str
    int8_file: str
    fp32_step: str
    int8_step: str
    export_fp32: Callable[[torch.nn.Module, PreprocessSpec, Path], None]
    quantize_int8: Callable[[Path, Path, TorchReference, PreprocessSpec], dict[str, Any]]
    runtime: str
    tensor_specs: Callable[[Path], tuple[TensorSpec, TensorSpec]]


def _onnx_specs(path: Path) -> tuple[TensorSpec, TensorSpec]:
    return TensorSpec(name="input", layout="NCHW", dtype="float32"), TensorSpec(
        name="output", layout="NC", dtype="float32"
    )


def _quantize_onnx(fp32: Path, out: Path, ref: TorchReference, preprocess: PreprocessSpec) -> dict[str, Any]:
    return quantize_onnx_int8(fp32, out, ref.calibration_views, ref.check)


def _quantize_tflite(
    fp32: Path, out: Path, ref: TorchReference, preprocess: PreprocessSpec
) -> dict[str, Any]:
    nhwc = (np.ascontiguousarray(x.transpose(0, 2, 3, 1)) for x in (ref.calibration, ref.check))
    return quantize_tflite_int8(fp32, out, next(nhwc), preprocess, next(nhwc))


EXPORTERS = (
    RuntimeExporter(
        "onnx",
        "model_fp32.onnx",
        "model_int8.onnx",
        "onnx fp32",
        "onnx int8 (static QDQ; float prefix chosen by measured agreement)",
        export_onnx_fp32,
        _quantize_onnx,
        "onnxruntime",
        _onnx_specs,
    ),
    RuntimeExporter(
        "tflite",
        "model_fp32.tflite",
        "model_int8.tflite",
        "tflite fp32 (litert-torch)",
        "tflite int8 (ai-edge-quantizer)",
        convert_tflite,
        _quantize_tflite,
        "litert",
        tflite_tensor_specs,
    ),
)
"""One row per runtime; ``{name}-fp32`` and ``{name}-int8`` are the artifact keys (see ALL_FORMATS)."""


def export_package(
    model: torch.nn.Module,
    spec: ExportSpec,
    calibration_frames: Sequence[np.ndarray],
    out_dir: str | Path,
    *,
    check_frames: Sequence[np.ndarray] | None = None,
    golden_frames: Sequence[np.ndarray] | None = None,
    before_commit: Callable[[ModelPackage], dict[str, Any]] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Export ``model`` (NCHW float input, logits output) into a verified package at ``out_dir``.

    ``calibration_frames`` are BGR camera frames that calibrate int8 (ONNX on their augmented views,
    ``spec.calibration_views``); ``check_frames`` (default: the calibration frames; pass frames of their
    own so agreement is not measured on what set the ranges) measure each artifact's top-1 agreement
    with torch fp32; golden inputs for device self-tests are chosen from ``golden_frames`` (default: the check frames).
    ``before_commit`` receives the finished draft package (artifacts loadable) and returns extra
    model.json fields (temperature, reference statistics, evaluation) to write with it.
    """
    out_dir = Path(out_dir)
    _check_request(spec, calibration_frames, out_dir, overwrite)
    check_frames = list(check_frames if check_frames is not None else calibration_frames)
    golden_frames = list(golden_frames if golden_frames is not None else check_frames)
    model = model.eval()
    steps = Steps("export", 4 + _runtime_steps(spec), enabled=progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a package is read by agents, servers and other users
    try:
        with steps.step(f"torch fp32 reference on {len(check_frames)} check frames"):
            ref = _torch_reference(model, spec, calibration_frames, check_frames)
        artifacts = _export_artifacts(model, spec, ref, tmp, steps)
        manifest = _draft_manifest(spec, artifacts, tmp)
        write_manifest(tmp, manifest)
        with steps.step(f"check every artifact against torch fp32 on {len(check_frames)} frames"):
            agreement, decisive = _measure_artifacts(
                load_package(tmp), artifacts, spec, ref, check_frames, steps
            )
        manifest = _add_golden_and_check(model, spec, manifest, [*check_frames], golden_frames, tmp, steps)
        if before_commit is not None:
            extra = before_commit(load_package(tmp))
            manifest = ModelManifest.model_validate({**manifest.model_dump(), **extra})
            write_manifest(tmp, manifest.model_copy(update={"files": _hash_files(tmp)}))
        load_package(tmp)  # the finished package must verify before it is published
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(package=load_package(out_dir), agreement=agreement, decisive_agreement=decisive)


def _check_request(
    spec: ExportSpec, calibration_frames: Sequence[np.ndarray], out_dir: Path, overwrite: bool
) -> None:
    """Refuse an export that cannot succeed before any work is done."""
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir}: already exists (pass overwrite to replace it)")
    unknown = set(spec.formats) - set(ALL_FORMATS)
    if unknown or not spec.formats:
        raise ExportError(f"unknown or no formats requested: {sorted(unknown)} (known: {ALL_FORMATS})")
    if len(calibration_frames) < 8:
        raise ExportError(f"need at least 8 calibration frames, got {len(calibration_frames)}")


def _torch_reference(
    model: torch.nn.Module,
    spec: ExportSpec,
    calibration_frames: Sequence[np.ndarray],
    check_frames: Sequence[np.ndarray],
) -> TorchReference:
    check = _float_nchw(check_frames, spec.preprocess)
    probs = to_probabilities(_torch_logits(model, check), spec.output_kind, spec.temperature)
    views = augmented_views(calibration_frames, spec.calibration_views, spec.calibration_seed)
    calibration = _float_nchw(calibration_frames, spec.preprocess)
    return TorchReference(calibration, _float_nchw(views, spec.preprocess), check, probs)


def _runtime_steps(spec: ExportSpec) -> int:
    """Progress steps :func:`_export_artifacts` takes: each runtime's fp32 export (int8 is quantized from
    it, so it runs when either is wanted) and its int8 quantization when wanted."""
    wanted = [[p for p in ("fp32", "int8") if f"{ex.name}-{p}" in spec.formats] for ex in EXPORTERS]
    return sum(bool(w) + ("int8" in w) for w in wanted)


def _export_artifacts(
    model: torch.nn.Module, spec: ExportSpec, ref: TorchReference, tmp: Path, steps: Steps
) -> dict[str, Artifact]:
    """Every requested artifact, runtime by runtime (:data:`EXPORTERS`), written into ``tmp``."""
    artifacts: dict[str, Artifact] = {}
    for ex in EXPORTERS:
        wanted = [p for p in ("fp32", "int8") if f"{ex.name}-{p}" in spec.formats]
        if not wanted:
            continue
        with steps.step(ex.fp32_step):
            ex.export_fp32(model, spec.preprocess, tmp / ex.fp32_file)
        if "fp32" in wanted:
            artifacts[f"{ex.name}-fp32"] = _artifact(ex, tmp / ex.fp32_file, "fp32", None)
        if "int8" in wanted:
            with steps.step(ex.int8_step):
                q = ex.quantize_int8(tmp / ex.fp32_file, tmp / ex.int8_file, ref, spec.preprocess)
                steps.note(f"{ex.name} int8 variants, top-1 agreement with {ex.name} fp32: {q['variants']}")
            artifacts[f"{ex.name}-int8"] = _artifact(ex, tmp / ex.int8_file, "int8", q)
        if "fp32" not in wanted:
            (tmp / ex.fp32_file).unlink()
    return artifacts


def _artifact(
    ex: RuntimeExporter, path: Path, precision: str, quantization: dict[str, Any] | None
) -> Artifact:
    i_spec, o_spec = ex.tensor_specs(path)
    return Artifact(
        file=path.name,
        runtime=ex.runtime,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        input=i_spec,
        output=o_spec,
        quantization=quantization,
    )


def _draft_manifest(spec: ExportSpec, artifacts: dict[str, Artifact], tmp: Path) -> ModelManifest:
    """model.json for the artifacts in ``tmp`` (agreement, golden inputs and the check come later)."""
    return ModelManifest(
        name=spec.name,
        version=spec.version,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        labels=list(spec.labels),
        preprocess=spec.preprocess,
        output_kind=spec.output_kind,  # type: ignore[arg-type]
        temperature=spec.temperature,
        artifacts=artifacts,
        files=_hash_files(tmp),
        telemetry_edges=default_edges(len(spec.labels)),
        provenance={
            **spec.provenance,
            "exporter": {
                "torch": torch.__version__,
                **_versions("onnx", "onnxruntime", "litert-torch", "ai-edge-quantizer", "ai-edge-litert"),
            },
        },
    )


def _measure_artifacts(
    draft: ModelPackage,
    artifacts: dict[str, Artifact],
    spec: ExportSpec,
    ref: TorchReference,
    check_frames: Sequence[np.ndarray],
    steps: Steps,
) -> tuple[dict[str, float], dict[str, float]]:
    """Each artifact's top-1 agreement with torch fp32 on the check frames (all, and where torch is
    at least 50% confident), run from ``draft`` and recorded on ``artifacts``."""
    agreement: dict[str, float] = {}
    decisive: dict[str, float] = {}
    confident = ref.probabilities.max(1) >= 0.5
    for key, art in artifacts.items():
        top1, _ = _artifact_top1(draft, key, check_frames, spec.output_kind, spec.temperature)
        agreement[key] = float(np.mean(top1 == ref.top1))
        decisive[key] = (
            float(np.mean(top1[confident] == ref.top1[confident])) if confident.any() else float("nan")
        )
        art.top1_agreement = round(agreement[key], 4)
        art.agreement_images = len(check_frames)
        if confident.any():
            art.top1_agreement_confident = round(decisive[key], 4)
        steps.note(
            f"{key}: top-1 agreement {agreement[key]:.1%} on {len(check_frames)} frames, "
            f"{decisive[key]:.1%} on the {int(confident.sum())} where torch is >= 50% confident"
        )
    return agreement, decisive


def _add_golden_and_check(
    model: torch.nn.Module,
    spec: ExportSpec,
    manifest: ModelManifest,
    check_frames: list[np.ndarray],
    golden_frames: list[np.ndarray],
    tmp: Path,
    steps: Steps,
) -> ModelManifest:
    """Golden inputs for the self-test and the agreement check devices run, written into model.json."""
    artifacts = manifest.artifacts
    with steps.step("golden inputs"):
        golden = _choose_golden(model, load_package(tmp), spec, golden_frames, tmp)
        if not golden:
            raise ExportError("no golden input is classified identically by torch and every artifact")
    with steps.step(f"agreement check ({spec.check_count} inputs with fp32 references)"):
        check = _build_agreement_check(model, load_package(tmp), spec, [*check_frames, *golden_frames], tmp)
        manifest = manifest.model_copy(update={"agreement_check": check, "files": _hash_files(tmp)})
        write_manifest(tmp, manifest)
        check = _measure_check(load_package(tmp), artifacts, spec.agreement_allowance)
        for key, art in artifacts.items():
            if art.check_agreement is not None and art.check_agreement < check.floor:
                steps.note(
                    f"warning: {key} agrees with fp32 on {art.check_agreement:.1%} of the check inputs on "
                    f"this CPU, below the floor {check.floor:.1%}: devices like this one will not serve it"
                )
    manifest = manifest.model_copy(
        update={"agreement_check": check, "artifacts": artifacts, "golden": golden, "files": _hash_files(tmp)}
    )
    write_manifest(tmp, manifest)
    return manifest


def _choose_golden(
    model: torch.nn.Module, draft: ModelPackage, spec: ExportSpec, frames: Sequence[np.ndarray], root: Path
) -> list[GoldenInput]:
    """The most confident frames on which torch and every artifact agree, saved as PNG files."""
    ref = to_probabilities(
        _torch_logits(model, _float_nchw(frames, spec.preprocess)), spec.output_kind, spec.temperature
    )
    ok = np.ones(len(frames), dtype=bool)
    for key in draft.manifest.artifacts:
        top1, _ = _artifact_top1(draft, key, frames, spec.output_kind, spec.temperature)
        ok &= top1 == ref.argmax(1)
    order = [i for i in np.argsort(-ref.max(1)) if ok[i]]
    chosen: list[GoldenInput] = []
    seen_classes: set[int] = set()
    (root / "golden").mkdir(exist_ok=True)
    for i in order:
        cls = int(ref[i].argmax())
        if cls in seen_classes:
            continue
        seen_classes.add(cls)
        name = f"golden/{len(chosen):02d}.png"
        # The frame itself, lossless: the self-test must see exactly the pixels torch classified.
        cv2.imwrite(str(root / name), frames[i])
        chosen.append(GoldenInput(file=name, expected_top1=cls, expected_label=spec.labels[cls]))
        if len(chosen) >= spec.golden_count:
            break
    return chosen


def _build_agreement_check(
    model: torch.nn.Module, draft: ModelPackage, spec: ExportSpec, frames: Sequence[np.ndarray], root: Path
) -> AgreementCheck:
    """``spec.check_count`` inputs spread over torch's confidence, half of them the least confident ones
    (all usable frames when there are fewer; real exports pass hundreds).

    Low-confidence inputs have small margins between the top two classes, so a kernel that computes
    something else (a saturating int8 path, a corrupt file) flips them first. Inputs are chosen on
    torch's output alone (only where the fp32 artifacts agree with torch, so float rounding cannot
    decide a tie), not on what the int8 artifacts did here, so a device measures the same quantity the
    export did. The images are stored at model size after the package's resize: the device checks the
    runtime, not the resize. The floor is set by :func:`_measure_check`.
    """
    images = np.stack([fit_frame(f, spec.preprocess) for f in frames])
    ref = to_probabilities(
        _torch_logits(model, _float_nchw(frames, spec.preprocess)), spec.output_kind, spec.temperature
    )
    ok = np.ones(len(frames), dtype=bool)
    for key, art in draft.manifest.artifacts.items():
        if art.precision == "fp32":
            top1, _ = _artifact_top1(draft, key, frames, spec.output_kind, spec.temperature)
            ok &= top1 == ref.argmax(1)
    usable = [int(i) for i in np.argsort(ref.max(1)) if ok[i]]  # least confident first
    if not usable:
        raise ExportError("agreement check: torch and the fp32 artifacts agree on no frame")
    n = min(spec.check_count, len(usable))
    low, rest = usable[: n // 2], usable[n // 2 :]
    spread = {rest[int(j)] for j in np.linspace(0, len(rest) - 1, n - len(low))}
    chosen = sorted(set(low) | spread)
    name = "agreement/check.npz"
    (root / "agreement").mkdir(exist_ok=True)
    with open(root / name, "wb") as f:
        np.savez_compressed(f, images=images[chosen], probabilities=ref[chosen].astype(np.float32))
    return AgreementCheck(
        file=name, count=len(chosen), floor=1.0, low_confidence=int((ref[chosen].max(1) < 0.5).sum())
    )


def _measure_check(draft: ModelPackage, artifacts: dict[str, Artifact], allowance: float) -> AgreementCheck:
    """Each artifact's agreement on the check here (into ``artifacts``), and the package's floor from it."""
    check = draft.manifest.agreement_check
    inputs = load_check(draft)
    assert check is not None and inputs is not None
    options = BackendOptions(threads=os.cpu_count() or 1)
    for key, art in artifacts.items():
        art.check_agreement = round(measure_agreement(draft, key, inputs, options=options).agreement, 4)
    int8 = [a.check_agreement for a in artifacts.values() if a.precision == "int8" and a.check_agreement]
    best = max(int8) if int8 else 1.0
    return check.model_copy(update={"floor": round(min(0.95, max(0.5, best - allowance)), 4)})


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished package into place; an existing package is replaced only after success."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _versions(*distributions: str) -> dict[str, str]:
    """Installed versions from package metadata (without importing the packages)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in distributions:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "unavailable"
    return out
