"""Train, calibrate, evaluate, gate and export a classifier package in one call.

:func:`train_package` is what ``edgefleet train`` runs and what the fleet loop's retraining policy calls
(with the original data combined with newly labelled samples, and the champion package for the gate)::

    from trainer.data import load_dataset
    from trainer.build import TrainConfig, train_package

    data = load_dataset("builtin:shapes").combine(new_labelled)      # content-hash splits stay stable
    result = train_package(data, "packages/v2", TrainConfig(version="2.0.0"), champion="packages/v1")
    result.package, result.evaluation.gate.passed, result.reference.atc_threshold

Steps: features of the frozen EfficientNet-Lite0 prefix once per image and augmented view (cached) ->
the new head (and optionally the last blocks) trained with early stopping on validation -> temperature
fitted on validation -> :func:`trainer.export.package.export_package` (ONNX/TFLite, fp32/int8), whose
``before_commit`` hook evaluates torch fp32 and every artifact on the test split, measures robustness,
computes the drift reference with the device artifact on held-out data, applies the gate against the
champion and writes the model card. Any failure (including the gate) leaves no package behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.errors import ConfigError
from edge_agent.package import ModelPackage, PreprocessSpec, load_package
from edge_agent.package_evaluation import Evaluation, ReportScores
from edge_agent.reference import ReferenceStats
from trainer.data.corruptions import CORRUPTIONS, SEVERITIES
from trainer.data.dataset import Dataset, DatasetManifest, Sample
from trainer.errors import GateError, LabelMismatchError
from trainer.evaluation.gate import GateCandidate, GateDecision, GateRules, check_gate
from trainer.export.package import ExportError, ExportReport, ExportSpec, export_package
from trainer.model.fit import FitConfig, FitResult
from trainer.ops.progress import Steps

log = logging.getLogger(__name__)

DATA_MANIFEST = "data_manifest.json"
_DEVICE_PREFERENCE = ("tflite-int8", "onnx-int8", "tflite-fp32", "onnx-fp32")


class RobustnessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    images: int = Field(default=40, ge=1)
    """Test images per corruption and severity (class-stratified subset)."""
    corruptions: list[str] = Field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[int] = Field(default_factory=lambda: list(SEVERITIES))
    models: Literal["all", "device"] = "all"
    """``all``: torch fp32 and every artifact; ``device``: torch fp32 and the device artifact only."""


class TrainConfig(BaseModel):
    """Everything :func:`train_package` needs besides the data and the output directory."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="classifier", min_length=1, max_length=64)
    version: str = Field(default="1.0.0", min_length=1, max_length=32)
    input_size: int = Field(default=224, ge=64, le=512, multiple_of=32)
    resize: Literal["center_crop", "squash", "letterbox"] = "center_crop"
    crop_fraction: float = Field(default=1.0, gt=0, le=1)
    unfreeze_blocks: int = Field(default=0, ge=0, le=16)
    aug_views: int = Field(default=2, ge=0, le=16)
    """Augmented views per training image (besides the clean one), each cached once."""
    fit: FitConfig = Field(default_factory=FitConfig)
    formats: list[str] = Field(
        default_factory=lambda: ["onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"]
    )
    device_artifact: str | None = None
    """Artifact devices run (reference statistics and gate); default: the first int8 artifact."""
    calibration_images: int = Field(default=128, ge=8)
    calibration_views: int = Field(default=512, ge=8)
    """ONNX int8 ranges come from this many augmented views (light, blur, noise, scale) of the calibration
    images (:func:`trainer.data.quant_frames.augmented_views`); see docs/quantization.md."""
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    gate: GateRules = Field(default_factory=GateRules)
    threads: int | None = Field(default=None, ge=1)
    checkpoint_dir: str | None = None
    feature_cache: str | None = None
    """Directory for cached backbone features (reused across runs, e.g. retraining)."""
    progress: bool = True

    def preprocess(self) -> PreprocessSpec:
        from trainer.model.pretrained import LITE0_PREPROCESS

        s = self.input_size
        return LITE0_PREPROCESS.model_copy(
            update={"size": (s, s), "resize": self.resize, "crop_fraction": self.crop_fraction}
        )


@dataclass(frozen=True)
class TrainResult:
    """A built package with what was measured on the way: evaluation, drift reference, the fit, timings."""

    package: ModelPackage
    evaluation: Evaluation
    reference: ReferenceStats
    fit: FitResult
    timings: dict[str, float] = field(default_factory=dict)


def _frames(samples: Sequence[Sample]) -> list[np.ndarray]:
    return [s.frame() for s in samples]


def _features(
    extractor: Any, cache: Any, samples: Sequence[Sample], views: int, seed: int, progress: bool
) -> np.ndarray:
    """Prefix outputs for every sample and view 0..views (view 0 = the clean frame), cached."""
    from tqdm import tqdm

    from trainer.data.augment import augment, view_rng

    keys = [(s, v) for s in samples for v in range(views + 1)]
    todo = [(s, v) for s, v in keys if cache.get(s.sha256, v) is None]
    with tqdm(
        total=len(todo), desc="features", unit="img", disable=not progress or not todo, leave=False
    ) as bar:
        for i in range(0, len(todo), extractor.batch):
            chunk = todo[i : i + extractor.batch]
            frames = [
                s.frame() if v == 0 else augment(s.frame(), view_rng(seed, s.sha256, v)) for s, v in chunk
            ]
            for (s, v), f in zip(chunk, extractor(frames)):
                cache.put(s.sha256, v, f)
            bar.update(len(chunk))
    return np.stack([cache.get(s.sha256, v) for s, v in keys])


def _calibration_samples(train: Sequence[Sample], labels: Sequence[str], n: int) -> list[Sample]:
    """Up to ``n`` training samples, classes interleaved, in a content-defined order."""
    by = {lab: sorted((s for s in train if s.label == lab), key=lambda s: s.sha256) for lab in labels}
    out: list[Sample] = []
    while len(out) < n and any(by.values()):
        for lab in labels:
            if by[lab] and len(out) < n:
                out.append(by[lab].pop(0))
    return out


def _device_artifact(config: TrainConfig) -> str:
    from trainer.export.package import ALL_FORMATS

    unknown = [f for f in config.formats if f not in ALL_FORMATS]
    if unknown or not config.formats:
        raise ConfigError(f"unknown or no formats {unknown} (known: {', '.join(ALL_FORMATS)})")
    if config.device_artifact:
        if config.device_artifact not in config.formats:
            raise ConfigError(
                f"device_artifact {config.device_artifact!r} is not among the formats {config.formats}"
            )
        return config.device_artifact
    return next(k for k in _DEVICE_PREFERENCE if k in config.formats)


def _check_champion(champion: str | Path | ModelPackage | None, labels: Sequence[str]) -> ModelPackage | None:
    if champion is None:
        return None
    pkg = champion if isinstance(champion, ModelPackage) else load_package(champion)
    if list(pkg.manifest.labels) != list(labels):
        extra, missing = (
            sorted(set(labels) - set(pkg.manifest.labels)),
            sorted(set(pkg.manifest.labels) - set(labels)),
        )
        why = f"new {extra}, missing {missing}" if extra or missing else "same names in a different order"
        raise LabelMismatchError(
            f"the data's labels differ from champion {pkg.manifest.name} {pkg.manifest.version} ({why}); a candidate "
            "can only be gated against a champion with the same label set: fix the class folders, or train without "
            "--champion to start a new model line"
        )
    return pkg


def _champion_device(pkg: ModelPackage, candidate_device: str) -> str:
    arts = pkg.manifest.artifacts
    if candidate_device in arts:
        return candidate_device
    return next(k for k in (*_DEVICE_PREFERENCE, *arts) if k in arts)


def _dataset_fingerprint(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.sha256}:{s.label};".encode())
    return h.hexdigest()[:16]


def train_package(
    data: Dataset | str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    champion: str | Path | ModelPackage | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train on ``data`` and write a verified, evaluated, gated package to ``out_dir``."""
    import torch

    config = config or TrainConfig()
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir}: already exists (pass overwrite to replace it)")
    inputs = _prepare(data, config, champion)
    torch.set_num_threads(inputs.threads)
    steps = Steps("train", 3, enabled=config.progress)
    steps.note(inputs.describe())
    features = _extract_features(config, inputs, steps)
    fit = _fit(config, inputs, features, steps)
    calibrated = _calibrated(fit, features, inputs, steps)
    check = _ReleaseCheck(config, inputs, features, calibrated, fit, t_start)
    with steps.step(f"export {', '.join(config.formats)} + evaluate + reference + gate + card"):
        t = time.perf_counter()
        pkg = _export(config, inputs, features, calibrated, check, out_dir, overwrite).package
        check.timings["export_total_s"] = time.perf_counter() - t
    check.timings["total_s"] = time.perf_counter() - t_start
    assert pkg.manifest.evaluation is not None and check.reference is not None  # written by the check
    return TrainResult(pkg, pkg.manifest.evaluation, check.reference, fit, dict(check.timings))


@dataclass(frozen=True)
class _Inputs:
    """The data split three ways, the labels, the champion to beat and where the model will run."""

    dataset: Dataset
    manifest: DatasetManifest
    """Every image's hash, label and split: provenance, the card's data section and data_manifest.json."""
    labels: list[str]
    champion: ModelPackage | None
    device: str
    threads: int
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def y(self, samples: Sequence[Sample]) -> np.ndarray:
        return self.dataset.index(samples)

    def describe(self) -> str:
        skipped = f", {len(self.dataset.skipped)} file(s) skipped" if self.dataset.skipped else ""
        return (
            f"{self.dataset.origin}: {len(self.labels)} classes, {len(self.train)} train / {len(self.val)} val / "
            f"{len(self.test)} test images{skipped}"
        )


def _added_since_champion(inputs: _Inputs) -> dict[str, Any]:
    """The training-set diff against the champion's data manifest (empty without a champion)."""
    if inputs.champion is None:
        return {}
    m = inputs.champion.manifest
    name = f"{m.name} {m.version}"
    path = Path(inputs.champion.root) / DATA_MANIFEST
    if not path.is_file():
        return {"added_since_champion": {"champion": name, "note": "the champion records no data manifest"}}
    before = DatasetManifest.model_validate_json(path.read_text(encoding="utf-8"))
    return {"added_since_champion": {"champion": name, **inputs.manifest.added_since(before)}}


def _prepare(
    data: Dataset | str | Path, config: TrainConfig, champion: str | Path | ModelPackage | None
) -> _Inputs:
    """Load and check the data, the champion and the formats before anything is computed."""
    from trainer.data.builtin import load_dataset

    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    dataset.require_trainable()
    for k in dataset.skipped:
        log.warning("skipped %s: %s", k.path, k.reason)
    labels = list(dataset.labels)
    return _Inputs(
        dataset,
        dataset.manifest(),
        labels,
        _check_champion(champion, labels),
        _device_artifact(config),
        config.threads or max(1, os.cpu_count() or 1),
        list(dataset.split("train")),
        list(dataset.split("val")),
        list(dataset.split("test")),
    )


@dataclass(frozen=True)
class _Features:
    """The classifier split into a frozen prefix and the trainable suffix, and the prefix's features."""

    model: Any
    suffix: Any
    extractor: Any
    cache: Any
    x_train: np.ndarray
    x_val: np.ndarray
    x_test: np.ndarray
    seconds: float


def _extract_features(config: TrainConfig, inputs: _Inputs, steps: Steps) -> _Features:
    """Step 1: features of the frozen prefix, once per image and view (cached across runs)."""
    from trainer.data.augment import AUGMENT_VERSION
    from trainer.model.backbone import build_classifier, split
    from trainer.model.features import FeatureCache, FeatureExtractor, prefix_fingerprint

    spec = config.preprocess()
    with steps.step(f"backbone features ({config.aug_views} augmented view(s) per training image)"):
        t = time.perf_counter()
        model = build_classifier(len(inputs.labels), config.fit.seed)
        prefix, suffix = split(model, config.unfreeze_blocks)
        extractor = FeatureExtractor(prefix, spec, threads=inputs.threads)
        cache = FeatureCache(
            prefix_fingerprint(config.unfreeze_blocks, spec, f"{AUGMENT_VERSION}:seed{config.fit.seed}"),
            config.feature_cache,
        )
        seed, bar = config.fit.seed, config.progress
        x_train = _features(extractor, cache, inputs.train, config.aug_views, seed, bar)
        x_val = _features(extractor, cache, inputs.val, 0, seed, bar)
        x_test = _features(extractor, cache, inputs.test, 0, seed, bar)
        steps.note(f"features via {extractor.runtime}: {cache.misses} computed, {cache.hits} from cache")
    return _Features(model, suffix, extractor, cache, x_train, x_val, x_test, time.perf_counter() - t)


def _fit(config: TrainConfig, inputs: _Inputs, features: _Features, steps: Steps) -> FitResult:
    """Step 2: the suffix (the head, and the last blocks when unfrozen), early-stopped on validation."""
    from trainer.model.fit import fit_suffix

    blocks = f" + last {config.unfreeze_blocks} blocks" if config.unfreeze_blocks else ""
    fingerprint = ":".join(
        [
            features.cache.fingerprint,
            _dataset_fingerprint(inputs.train),
            _dataset_fingerprint(inputs.val),
            str(config.aug_views),
        ]
    )
    with steps.step(f"train (head{blocks})"):
        fit = fit_suffix(
            features.suffix,
            features.x_train,
            np.repeat(inputs.y(inputs.train), config.aug_views + 1),
            features.x_val,
            inputs.y(inputs.val),
            config.fit,
            num_classes=len(inputs.labels),
            checkpoint_dir=config.checkpoint_dir,
            progress=config.progress,
            fingerprint=fingerprint,
        )
        steps.note(
            f"best epoch {fit.best_epoch + 1} of {fit.epochs_run}: val accuracy {fit.best_val_accuracy:.1%}"
        )
    return fit


@dataclass(frozen=True)
class _Calibrated:
    """Step 3: the temperature fitted on validation, its report, and calibrated torch probabilities."""

    temperature: float
    report: dict[str, Any]
    p_val: np.ndarray
    p_test: np.ndarray


def _calibrated(fit: FitResult, features: _Features, inputs: _Inputs, steps: Steps) -> _Calibrated:
    from trainer.model.fit import predict_logits

    t, report, p_val, p_test = _calibrate(
        predict_logits(features.suffix, features.x_val),
        inputs.y(inputs.val),
        predict_logits(features.suffix, features.x_test),
        inputs.y(inputs.test),
    )
    test = report["test"]
    steps.note(f"temperature {t:.3f}: test ECE {test['ece_before']:.2%} -> {test['ece_after']:.2%}")
    return _Calibrated(t, report, p_val, p_test)


def _export(
    config: TrainConfig,
    inputs: _Inputs,
    features: _Features,
    calibrated: _Calibrated,
    check: _ReleaseCheck,
    out_dir: Path,
    overwrite: bool,
) -> ExportReport:
    """Step 4: export every format; ``check`` evaluates, gates and writes the card before the commit."""
    calib = _frames(_calibration_samples(inputs.train, inputs.labels, config.calibration_images))
    manifest = inputs.manifest
    spec = ExportSpec(
        name=config.name,
        version=config.version,
        labels=inputs.labels,
        preprocess=config.preprocess(),
        temperature=calibrated.temperature,
        formats=config.formats,
        golden_count=min(len(inputs.labels), 8),
        calibration_views=config.calibration_views,
        provenance={
            "trainer": "edgefleet train",
            "dataset": inputs.dataset.origin,
            "dataset_manifest_sha256": hashlib.sha256(manifest.model_dump_json().encode()).hexdigest(),
            "config": config.model_dump(mode="json", exclude={"progress"}),
            "calibration": f"{len(calib)} training images (ONNX: {config.calibration_views} augmented views)",
            **({"champion": inputs.champion.sha256} if inputs.champion else {}),
        },
    )
    held = check.held
    return export_package(
        features.model,
        spec,
        calib,
        out_dir,
        check_frames=held.frames[: held.n_val],
        golden_frames=held.frames,
        before_commit=check,
        overwrite=overwrite,
        progress=config.progress,
    )


class _ReleaseCheck:
    """Step 4's ``before_commit``: every artifact evaluated, the drift reference, the gate, the card.

    It holds what it measures (``evaluation``, ``reference``, ``timings``) as attributes, so the build
    reads them afterwards instead of a closure writing into outer dictionaries.
    """

    def __init__(
        self,
        config: TrainConfig,
        inputs: _Inputs,
        features: _Features,
        calibrated: _Calibrated,
        fit: FitResult,
        t_start: float,
    ) -> None:
        from trainer.evaluation.runners import TorchRunner, report

        self.config, self.inputs, self.calibrated, self.t_start = config, inputs, calibrated, t_start
        self.timings: dict[str, float] = {"features_s": features.seconds, "train_s": fit.seconds}
        self.reference: ReferenceStats | None = None
        y_val, y_test = inputs.y(inputs.val), inputs.y(inputs.test)
        several_sources = len({x.source for x in inputs.test}) > 1
        test_meta = [{**s.meta, **({"source": s.source} if several_sources else {})} for s in inputs.test]
        self.held = _Heldout(
            _frames(inputs.val) + _frames(inputs.test), np.concatenate([y_val, y_test]), len(y_val), test_meta
        )
        self.torch_runner = TorchRunner(features.extractor, features.suffix, calibrated.temperature)
        p_held = np.concatenate([calibrated.p_val, calibrated.p_test])
        self.evaluation: dict[str, Any] = {
            "dataset": inputs.manifest.summary() | _added_since_champion(inputs),
            "device_artifact": inputs.device,
            "calibration": calibrated.report,
            "models": {"torch-fp32": report(calibrated.p_test, y_test, inputs.labels, test_meta)},
            "heldout_accuracy": {"torch-fp32": float((p_held.argmax(1) == self.held.y).mean())},
            "training": _training_summary(
                config, fit, features.extractor.runtime, features.cache, len(features.x_train), inputs.threads
            ),
        }

    def __call__(self, draft: ModelPackage) -> dict[str, Any]:
        from trainer.evaluation.card import write_card
        from trainer.evaluation.reference import reference_stats

        config, inputs, held, device = self.config, self.inputs, self.held, self.inputs.device
        t = time.perf_counter()
        held_pred = _evaluate_artifacts(
            draft,
            self.evaluation,
            held,
            inputs.labels,
            self.calibrated.p_test,
            self.torch_runner,
            config,
            device,
            inputs.threads,
        )
        held_pred["torch-fp32"] = np.concatenate([self.calibrated.p_val, self.calibrated.p_test]).argmax(1)
        self.timings["evaluate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        reference, _ = reference_stats(draft, device, held.frames, held.y, threads=1)
        self.timings["reference_s"] = time.perf_counter() - t
        self.reference = reference
        self.evaluation["reference_data"] = {
            "splits": ["val", "test"],
            "images": len(held.frames),
            "artifact": device,
            "accuracy": reference.accuracy,
            "atc_threshold": reference.atc_threshold,
        }
        decision = self._gate(draft, held_pred)
        if not decision.passed:
            raise GateError(
                decision.failures(), evaluation=Evaluation.model_validate(_jsonable(self.evaluation))
            )
        (Path(draft.root) / DATA_MANIFEST).write_text(
            inputs.manifest.model_dump_json(indent=1), encoding="utf-8"
        )
        evaluation = Evaluation.model_validate(_jsonable(self.evaluation))
        write_card(draft.root, draft.manifest, evaluation, reference)
        return {
            "reference": reference.model_dump(mode="json"),
            "evaluation": evaluation.model_dump(mode="json"),
        }

    def _gate(self, draft: ModelPackage, held_pred: dict[str, np.ndarray]) -> GateDecision:
        """The gate against the champion (if any) on the same test images; recorded in the evaluation."""
        inputs, device, held = self.inputs, self.inputs.device, self.held
        champion_eval, champion_pred = (
            _champion_report(inputs.champion, device, held, inputs.labels, inputs.threads)
            if inputs.champion
            else (None, None)
        )
        if champion_eval is not None:
            self.evaluation["champion"] = champion_eval
        device_report = self.evaluation["models"][device]
        int8 = [k for k, a in draft.manifest.artifacts.items() if a.precision == "int8"]
        pairs = _paired_counts(held, held_pred, int8, device, champion_pred, device_report["slices"])
        candidate = GateCandidate(
            device=ReportScores.model_validate(_jsonable(device_report)),
            heldout_accuracy=self.evaluation["heldout_accuracy"],
            int8=int8,
        )
        champion = ReportScores.model_validate(_jsonable(champion_eval["device"])) if champion_eval else None
        decision = check_gate(candidate, champion, self.config.gate, pairs)
        self.evaluation["gate"] = decision.record(self.config.gate, pairs).model_dump(mode="json")
        self.timings["total_s"] = time.perf_counter() - self.t_start
        self.evaluation["timings_s"] = dict(self.timings)
        return decision


def _training_summary(
    config: TrainConfig, fit: FitResult, runtime: str, cache: Any, views: int, threads: int
) -> dict[str, Any]:
    """How the model was trained (for model.json and the card)."""
    f = config.fit
    return {
        "backbone": "efficientnet-lite0 (ImageNet)",
        "unfreeze_blocks": config.unfreeze_blocks,
        "aug_views": config.aug_views,
        "input_size": config.input_size,
        "train_views": views,
        "epochs_run": fit.epochs_run,
        "best_epoch": fit.best_epoch + 1,
        "best_val_nll": fit.best_val_nll,
        "best_val_accuracy": fit.best_val_accuracy,
        "seed": f.seed,
        "lr": f.lr,
        "weight_decay": f.weight_decay,
        "class_balanced": f.balance,
        "threads": threads,
        "features_runtime": runtime,
        "features_computed": cache.misses,
        "features_cached": cache.hits,
        "history": fit.history,
    }


@dataclass
class _Heldout:
    """Validation then test frames with their labels, and the test images' slice metadata."""

    frames: list[np.ndarray]
    y: np.ndarray
    n_val: int
    test_meta: list[dict[str, str]]

    @property
    def test_frames(self) -> list[np.ndarray]:
        return self.frames[self.n_val :]

    @property
    def y_test(self) -> np.ndarray:
        return self.y[self.n_val :]


def _calibrate(
    logits_val: np.ndarray, y_val: np.ndarray, logits_test: np.ndarray, y_test: np.ndarray
) -> tuple[float, dict[str, Any], np.ndarray, np.ndarray]:
    """Temperature fitted on validation; ECE/NLL before and after on both splits; calibrated probabilities."""
    from edge_agent.postprocess import to_probabilities
    from trainer.evaluation.calibration import fit_temperature
    from trainer.evaluation.metrics import ece, nll, reliability

    t = fit_temperature(logits_val, y_val)

    def probs(logits: np.ndarray, temperature: float) -> np.ndarray:  # the device's softmax, in float64
        return to_probabilities(logits, "logits", temperature).astype(np.float64)

    def scores(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
        raw, cal = probs(logits, 1.0), probs(logits, t)
        return {
            "ece_before": ece(raw, y),
            "ece_after": ece(cal, y),
            "nll_before": nll(raw, y),
            "nll_after": nll(cal, y),
        }

    report = {
        "temperature": t,
        "fitted_on": "val",
        "fit_images": len(y_val),
        "bins": 15,
        "val": scores(logits_val, y_val),
        "test": scores(logits_test, y_test),
        "reliability_before": reliability(probs(logits_test, 1.0), y_test),
        "reliability_after": reliability(probs(logits_test, t), y_test),
    }
    return t, report, probs(logits_val, t), probs(logits_test, t)


def _evaluate_artifacts(
    draft: ModelPackage,
    evaluation: dict[str, Any],
    held: _Heldout,
    labels: list[str],
    p_test_torch: np.ndarray,
    torch_runner: Any,
    config: TrainConfig,
    device: str,
    threads: int,
) -> dict[str, np.ndarray]:
    """Every artifact on the held-out frames (reports on test, accuracy on val+test) and robustness;
    fills ``evaluation`` and returns each artifact's held-out predictions."""
    from trainer.evaluation.runners import ArtifactRunner, Runner, report, robustness, stratified

    runners = {key: ArtifactRunner(draft, key, threads=threads) for key in draft.manifest.artifacts}
    pred: dict[str, np.ndarray] = {}
    try:
        for key, run in runners.items():
            p = run(held.frames)
            pred[key] = p.argmax(1)
            r = evaluation["models"][key] = report(p[held.n_val :], held.y_test, labels, held.test_meta)
            r["agreement_with_torch"] = float((pred[key][held.n_val :] == p_test_torch.argmax(1)).mean())
            evaluation["heldout_accuracy"][key] = float((pred[key] == held.y).mean())
        fp32 = evaluation["heldout_accuracy"]["torch-fp32"]
        evaluation["int8_minus_fp32_points"] = {  # held-out accuracy of each int8 artifact minus torch fp32's
            k: 100 * (evaluation["heldout_accuracy"][k] - fp32)
            for k, a in draft.manifest.artifacts.items()
            if a.precision == "int8"
        }
        rc = config.robustness
        if rc.enabled:
            idx = stratified(held.y_test, rc.images, seed=config.fit.seed)
            chosen: dict[str, Runner] = {"torch-fp32": torch_runner, **runners}
            if rc.models == "device":
                chosen = {"torch-fp32": torch_runner, device: runners[device]}
            evaluation["robustness"] = robustness(
                chosen,
                [held.test_frames[i] for i in idx],
                held.y_test[idx],
                corruptions=rc.corruptions,
                severities=rc.severities,
                seed=config.fit.seed,
                progress=config.progress,
            )
    finally:
        for run in runners.values():
            run.close()
    return pred


def _champion_report(
    champ: ModelPackage, device: str, held: _Heldout, labels: list[str], threads: int
) -> tuple[dict[str, Any], np.ndarray]:
    """The champion's device artifact on the candidate's test frames, and its predictions."""
    from trainer.evaluation.runners import ArtifactRunner, report

    key = _champion_device(champ, device)
    run = ArtifactRunner(champ, key, threads=threads)
    try:
        p = run(held.test_frames)
    finally:
        run.close()
    m = champ.manifest
    return {
        "name": m.name,
        "version": m.version,
        "sha256": champ.sha256,
        "artifact": key,
        "device": report(p, held.y_test, labels, held.test_meta),
    }, p.argmax(1)


def _paired_counts(
    held: _Heldout,
    pred: dict[str, np.ndarray],
    int8: list[str],
    device: str,
    champion_pred: np.ndarray | None,
    slices: dict[str, Any],
) -> dict[str, tuple[int, int]]:
    """Discordant counts for the gate: int8 vs torch fp32 (held-out), candidate vs champion (test, per slice)."""
    ok = {k: v == held.y for k, v in pred.items()}
    pairs = {f"int8[{k}]": _discordant(ok["torch-fp32"], ok[k]) for k in int8}
    if champion_pred is not None:
        cand_ok, champ_ok = ok[device][held.n_val :], champion_pred == held.y_test
        pairs["overall"] = _discordant(champ_ok, cand_ok)
        for key, values in slices.items():
            vals = np.array([m.get(key, "(none)") for m in held.test_meta])
            for value in values:
                pairs[f"slice[{key}={value}]"] = _discordant(champ_ok[vals == value], cand_ok[vals == value])
    return pairs


def _discordant(reference_ok: np.ndarray, model_ok: np.ndarray) -> tuple[int, int]:
    """(images only the reference gets right, images only the model gets right)."""
    return int((reference_ok & ~model_ok).sum()), int((~reference_ok & model_ok).sum())


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy scalars and arrays converted)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
