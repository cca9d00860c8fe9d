"""Evaluation of a model on labelled frames: metrics, slices and robustness, for torch and every artifact.

A *runner* turns BGR camera frames into calibrated probabilities. :class:`ArtifactRunner` goes through
exactly what a device runs (``edge_agent`` preprocessing, runtime backend, ``to_probabilities`` with
the package temperature), so the cost of int8 is measured on the artifacts themselves;
:class:`TorchRunner` runs the trained fp32 weights. The same corrupted frames are fed to every runner,
so their robustness numbers are comparable image for image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edge_agent.backends import BackendOptions, load_backend
from edge_agent.package import ModelPackage
from edge_agent.postprocess import to_probabilities
from edge_agent.preprocess import Preprocessor
from trainer.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from trainer.evaluation.metrics import classification_report

Runner = Callable[[Sequence[np.ndarray]], np.ndarray]
MAX_SLICE_VALUES = 20


class ArtifactRunner:
    """One package artifact through the edge preprocessing and runtime, in batches."""

    def __init__(
        self, package: ModelPackage, key: str, *, threads: int | None = None, batch: int = 16
    ) -> None:
        m = package.manifest
        self.key = key
        self.output_kind = m.output_kind
        self.temperature = m.temperature
        self.batch = batch
        self.backend = load_backend(
            package, key, BackendOptions(threads=threads or max(1, os.cpu_count() or 1), batch=batch)
        )
        self.pre = Preprocessor(m.preprocess, m.artifacts[key].input)

    def __call__(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(frames), self.batch):
            x = np.concatenate([self.pre(f)[0] for f in frames[i : i + self.batch]])
            out.append(to_probabilities(self.backend.run(x), self.output_kind, self.temperature))
        return np.concatenate(out)

    def close(self) -> None:
        self.backend.close()


class TorchRunner:
    """The trained fp32 weights: frozen prefix (see :mod:`trainer.model.features`) then the torch suffix."""

    def __init__(self, extractor: Any, suffix: Any, temperature: float) -> None:
        self.extractor = extractor
        self.suffix = suffix
        self.temperature = temperature

    def logits(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        from trainer.model.fit import predict_logits

        return predict_logits(self.suffix, self.extractor(frames))

    def __call__(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        return to_probabilities(self.logits(frames), "logits", self.temperature)


def slice_keys(metas: Sequence[Mapping[str, str]]) -> list[str]:
    """Metadata keys worth slicing on: 2..20 distinct values among the samples, counting "(none)" for
    samples without the key (so a key only some samples carry, like origin=field, still slices)."""
    values: dict[str, set[str]] = {}
    for m in metas:
        for k, v in m.items():
            values.setdefault(k, set()).add(v)
    for k, vals in values.items():
        if any(k not in m for m in metas):
            vals.add("(none)")
    return sorted(k for k, v in values.items() if 2 <= len(v) <= MAX_SLICE_VALUES)


def slices(
    probs: np.ndarray, y: np.ndarray, metas: Sequence[Mapping[str, str]]
) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy and image count per value of every sliceable metadata key."""
    pred = probs.argmax(1)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key in slice_keys(metas):
        vals = np.array([m.get(key, "(none)") for m in metas])
        out[key] = {
            str(v): {
                "images": int((vals == v).sum()),
                "accuracy": float((pred[vals == v] == y[vals == v]).mean()),
            }
            for v in sorted(set(vals.tolist()))
        }
    return out


def report(
    probs: np.ndarray, y: np.ndarray, labels: Sequence[str], metas: Sequence[Mapping[str, str]]
) -> dict[str, object]:
    """Classification report plus per-slice accuracy."""
    r = classification_report(probs, y, labels)
    r["slices"] = slices(probs, y, metas)
    return r


def robustness(
    runners: Mapping[str, Runner],
    frames: Sequence[np.ndarray],
    y: np.ndarray,
    *,
    corruptions: Sequence[str] = tuple(CORRUPTIONS),
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of every runner per corruption and severity, on the same corrupted frames."""
    from tqdm import tqdm

    acc: dict[str, dict[str, list[float]]] = {name: {} for name in runners}
    total = len(corruptions) * len(severities)
    with tqdm(total=total, desc="robustness", unit="corruption", disable=not progress, leave=False) as bar:
        for ci, cname in enumerate(corruptions):
            for name in runners:
                acc[name][cname] = []
            for s in severities:
                bad = [
                    corrupt(f, cname, s, np.random.default_rng([seed, ci, s, i]))
                    for i, f in enumerate(frames)
                ]
                for name, run in runners.items():
                    acc[name][cname].append(float((run(bad).argmax(1) == y).mean()))
                bar.update(1)
    return {
        "images": len(frames),
        "corruptions": list(corruptions),
        "severities": list(severities),
        "models": {
            name: {
                "accuracy": a,
                "mean_corruption_accuracy": float(np.mean([v for vs in a.values() for v in vs])),
            }
            for name, a in acc.items()
        },
    }


def stratified(y: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``limit`` samples, classes interleaved so every class is represented."""
    if limit >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    per = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)}
    out: list[int] = []
    while len(out) < limit:
        for c in list(per):
            if per[c] and len(out) < limit:
                out.append(int(per[c].pop()))
    return np.array(sorted(out))


def label_positions(dataset_labels: Sequence[str], model_labels: Sequence[str]) -> np.ndarray:
    """Map dataset class indices to the model's (same names, possibly another order)."""
    from trainer.errors import LabelMismatchError

    missing = [lab for lab in dataset_labels if lab not in model_labels]
    if missing:
        raise LabelMismatchError(
            f"the data has classes {missing} that the model does not know (model labels: {list(model_labels)})"
        )
    pos = {lab: i for i, lab in enumerate(model_labels)}
    return np.array([pos[lab] for lab in dataset_labels], dtype=np.int64)


def evaluate_package(
    package: ModelPackage,
    dataset: Any,
    *,
    split: str = "test",
    artifacts: Sequence[str] | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    robustness_images: int = 40,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Every (or the named) artifact of ``package`` on a dataset split (``all`` = every sample)."""
    from trainer.errors import DataError

    m = package.manifest
    samples = dataset.samples if split == "all" else dataset.split(split)
    if not samples:
        raise DataError(f"{dataset.origin}: the {split} split is empty; use --split all or add images")
    cols = label_positions(dataset.labels, m.labels)
    y = cols[dataset.index(samples)]
    frames = [s.frame() for s in samples]
    metas = [
        {**s.meta, **({"source": s.source} if len({x.source for x in samples}) > 1 else {})} for s in samples
    ]
    keys = list(artifacts or m.artifacts)
    unknown = [k for k in keys if k not in m.artifacts]
    if unknown:
        raise DataError(f"{package.root}: no artifact(s) {unknown} (has: {list(m.artifacts)})")
    runners = {k: ArtifactRunner(package, k, threads=threads) for k in keys}
    out: dict[str, Any] = {
        "package": {
            "name": m.name,
            "version": m.version,
            "sha256": package.sha256,
            "temperature": m.temperature,
        },
        "data": dataset.origin,
        "split": split,
        "images": len(samples),
        "labels": list(m.labels),
    }
    try:
        out["models"] = {k: report(run(frames), y, m.labels, metas) for k, run in runners.items()}
        if corruptions:
            idx = stratified(y, robustness_images, seed)
            out["robustness"] = robustness(
                runners,
                [frames[i] for i in idx],
                y[idx],
                corruptions=corruptions,
                severities=severities,
                seed=seed,
                progress=progress,
            )
    finally:
        for run in runners.values():
            run.close()
    return out
