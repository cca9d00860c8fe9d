"""Train, calibrate, evaluate, gate and export a classifier package in one call.

:func:`train_package` is what ``edgefleet train`` runs and what the fleet loop's retraining policy calls
(with the original data combined with newly labelled samples, and the champion package for the gate)::

    from trainer.data import load_dataset
    from trainer.build import TrainConfig, train_package

    data = load_dataset("builtin:shapes").combine(new_labelled)      # content-hash splits stay stable
    result = train_package(data, "packages/v2", TrainConfig(version="2.0.0"), champion="packages/v1")
    result.package, result.evaluation["gate"], result.reference.atc_threshold

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
from edge_agent.reference import ReferenceStats
from trainer.data.corruptions import CORRUPTIONS, SEVERITIES
from trainer.data.dataset import Dataset, Sample
from trainer.errors import GateError, LabelMismatchError
from trainer.evaluation.gate import GateRules, check_gate
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


@dataclass
class TrainResult:
    package: ModelPackage
    evaluation: dict[str, Any]
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

    from trainer.data.augment import AUGMENT_VERSION
    from trainer.data.builtin import load_dataset
    from trainer.evaluation.card import write_card
    from trainer.evaluation.reference import reference_stats
    from trainer.evaluation.runners import TorchRunner, report
    from trainer.export.package import ExportError, ExportSpec, export_package
    from trainer.model.backbone import build_classifier, split
    from trainer.model.features import FeatureCache, FeatureExtractor, prefix_fingerprint
    from trainer.model.fit import fit_suffix, predict_logits

    config = config or TrainConfig()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir}: already exists (pass overwrite to replace it)")
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    dataset.require_trainable()
    for k in dataset.skipped:
        log.warning("skipped %s: %s", k.path, k.reason)
    labels = list(dataset.labels)
    champ = _check_champion(champion, labels)
    device = _device_artifact(config)
    threads = config.threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    steps = Steps("train", 3, enabled=config.progress)
    train_s, val_s, test_s = dataset.split("train"), dataset.split("val"), dataset.split("test")
    y_train, y_val, y_test = dataset.index(train_s), dataset.index(val_s), dataset.index(test_s)
    steps.note(
        f"{dataset.origin}: {len(labels)} classes, {len(train_s)} train / {len(val_s)} val / {len(test_s)} test images"
        + (f", {len(dataset.skipped)} file(s) skipped" if dataset.skipped else "")
    )

    # 1. features of the frozen prefix, once per image and view
    spec = config.preprocess()
    with steps.step(f"backbone features ({config.aug_views} augmented view(s) per training image)"):
        t = time.perf_counter()
        model = build_classifier(len(labels), config.fit.seed)
        prefix, suffix = split(model, config.unfreeze_blocks)
        extractor = FeatureExtractor(prefix, spec, threads=threads)
        cache = FeatureCache(
            prefix_fingerprint(config.unfreeze_blocks, spec, f"{AUGMENT_VERSION}:seed{config.fit.seed}"),
            config.feature_cache,
        )
        x_train = _features(extractor, cache, train_s, config.aug_views, config.fit.seed, config.progress)
        x_val = _features(extractor, cache, val_s, 0, config.fit.seed, config.progress)
        x_test = _features(extractor, cache, test_s, 0, config.fit.seed, config.progress)
        y_train_views = np.repeat(y_train, config.aug_views + 1)
        timings["features_s"] = time.perf_counter() - t
        steps.note(f"features via {extractor.runtime}: {cache.misses} computed, {cache.hits} from cache")

    # 2. the suffix
    with steps.step(
        f"train (head{f' + last {config.unfreeze_blocks} blocks' if config.unfreeze_blocks else ''})"
    ):
        fit = fit_suffix(
            suffix,
            x_train,
            y_train_views,
            x_val,
            y_val,
            config.fit,
            num_classes=len(labels),
            checkpoint_dir=config.checkpoint_dir,
            progress=config.progress,
            fingerprint=f"{cache.fingerprint}:{_dataset_fingerprint(train_s)}:{_dataset_fingerprint(val_s)}:{config.aug_views}",
        )
        timings["train_s"] = fit.seconds
        steps.note(
            f"best epoch {fit.best_epoch + 1} of {fit.epochs_run}: val accuracy {fit.best_val_accuracy:.1%}"
        )

    # 3. temperature on validation; ECE before/after on test
    temperature, calibration, p_val, p_test = _calibrate(
        predict_logits(suffix, x_val), y_val, predict_logits(suffix, x_test), y_test
    )
    steps.note(
        f"temperature {temperature:.3f}: test ECE {calibration['test']['ece_before']:.2%} -> {calibration['test']['ece_after']:.2%}"
    )
    heldout_y = np.concatenate([y_val, y_test])
    test_meta = [
        {**s.meta, **({"source": s.source} if len({x.source for x in test_s}) > 1 else {})} for s in test_s
    ]
    manifest = dataset.manifest()
    evaluation: dict[str, Any] = {
        "dataset": manifest.summary(),
        "device_artifact": device,
        "calibration": calibration,
        "models": {"torch-fp32": report(p_test, y_test, labels, test_meta)},
        "heldout_accuracy": {
            "torch-fp32": float((np.concatenate([p_val, p_test]).argmax(1) == heldout_y).mean())
        },
        "training": _training_summary(config, fit, extractor.runtime, cache, len(x_train), threads),
    }

    # 4. export; the hook evaluates every artifact, computes the reference, gates and writes the card
    held = _Heldout(_frames(val_s) + _frames(test_s), heldout_y, len(val_s), test_meta)
    calib = _frames(_calibration_samples(train_s, labels, config.calibration_images))
    torch_runner = TorchRunner(extractor, suffix, temperature)
    result: dict[str, Any] = {}

    def before_commit(draft: ModelPackage) -> dict[str, Any]:
        t_eval = time.perf_counter()
        held_pred = _evaluate_artifacts(
            draft, evaluation, held, labels, p_test, torch_runner, config, device, threads
        )
        held_pred["torch-fp32"] = np.concatenate([p_val, p_test]).argmax(1)
        timings["evaluate_s"] = time.perf_counter() - t_eval
        t_ref = time.perf_counter()
        reference, _ = reference_stats(draft, device, held.frames, held.y, threads=1)
        timings["reference_s"] = time.perf_counter() - t_ref
        evaluation["reference_data"] = {
            "splits": ["val", "test"],
            "images": len(held.frames),
            "artifact": device,
            "accuracy": reference.accuracy,
            "atc_threshold": reference.atc_threshold,
        }
        champion_eval, champion_pred = (
            _champion_report(champ, device, held, labels, threads) if champ else (None, None)
        )
        if champion_eval is not None:
            evaluation["champion"] = champion_eval
        int8 = [k for k, a in draft.manifest.artifacts.items() if a.precision == "int8"]
        pairs = _paired_counts(
            held, held_pred, int8, device, champion_pred, evaluation["models"][device]["slices"]
        )
        gate = check_gate(
            {
                "device": evaluation["models"][device],
                "heldout_accuracy": evaluation["heldout_accuracy"],
                "int8": int8,
            },
            champion_eval,
            config.gate,
            pairs,
        )
        evaluation["gate"] = {**gate.as_dict(), "rules_config": config.gate.model_dump(), "discordant": pairs}
        timings["total_s"] = time.perf_counter() - t_start
        evaluation["timings_s"] = dict(timings)
        result["reference"] = reference
        if not gate.passed:
            raise GateError(gate.failures(), evaluation=evaluation)
        (Path(draft.root) / DATA_MANIFEST).write_text(manifest.model_dump_json(indent=1), encoding="utf-8")
        write_card(draft.root, draft.manifest, evaluation, reference)
        return {"reference": reference.model_dump(mode="json"), "evaluation": _jsonable(evaluation)}

    spec_export = ExportSpec(
        name=config.name,
        version=config.version,
        labels=labels,
        preprocess=spec,
        temperature=temperature,
        formats=config.formats,
        golden_count=min(len(labels), 8),
        provenance={
            "trainer": "edgefleet train",
            "dataset": dataset.origin,
            "dataset_manifest_sha256": hashlib.sha256(manifest.model_dump_json().encode()).hexdigest(),
            "config": config.model_dump(mode="json", exclude={"progress"}),
            "calibration": f"{len(calib)} training images",
            **({"champion": champ.sha256} if champ else {}),
        },
    )
    with steps.step(f"export {', '.join(config.formats)} + evaluate + reference + gate + card"):
        t = time.perf_counter()
        report_ = export_package(
            model,
            spec_export,
            calib,
            out_dir,
            check_frames=held.frames[: held.n_val],
            golden_frames=held.frames,
            before_commit=before_commit,
            overwrite=overwrite,
            progress=config.progress,
        )
        timings["export_total_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    pkg = report_.package
    return TrainResult(pkg, pkg.manifest.evaluation or {}, result["reference"], fit, timings)


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
