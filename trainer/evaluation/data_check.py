"""``edgefleet data check``: find what would make training or evaluation on a dataset misleading.

Blocking (exit status 1): corrupt or unreadable images, empty classes, fewer than two classes, tiny
classes, a class without training images, exact duplicates with conflicting labels, and near-duplicate
images across splits (perceptual hash: a test image whose twin is in training leaks and inflates test
accuracy). Warnings: class imbalance, classes missing from validation or test, duplicates within a
split, and likely label errors: images whose given label the current model strongly disagrees with.

"The current model" is a package's device artifact when one is given (``--package``); otherwise an
out-of-fold linear probe on ImageNet EfficientNet-Lite0 features (every image is judged by a probe that
never saw it), which finds gross label errors without any trained model.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from edge_agent.package import ModelPackage
from trainer.data.dataset import SPLITS, Dataset, Sample

Severity = Literal["blocking", "warning", "info"]


@dataclass
class Finding:
    severity: Severity
    kind: str
    message: str
    items: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    origin: str
    summary: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)

    def add(self, severity: Severity, kind: str, message: str, items: Sequence[str] = ()) -> None:
        self.findings.append(Finding(severity, kind, message, list(items)))

    def count(self, severity: Severity) -> int:
        return sum(f.severity == severity for f in self.findings)

    def failed(self, strict: bool = False) -> bool:
        """Blocking problems (and, with ``strict``, warnings) found."""
        return self.count("blocking") > 0 or (strict and self.count("warning") > 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "summary": self.summary,
            "findings": [f.__dict__ for f in self.findings],
        }

    def to_text(self, max_items: int = 10) -> str:
        s = self.summary
        per = " / ".join(f"{k} {v}" for k, v in s["per_split"].items())
        lines = [f"data check: {self.origin}", f"  {s['images']} images in {s['classes']} classes ({per})"]
        lines.append("  per class: " + ", ".join(f"{k} {v}" for k, v in s["per_class"].items()))
        order = {"blocking": 0, "warning": 1, "info": 2}
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            lines.append(f"{f.severity.upper():9s} {f.kind}: {f.message}")
            lines += [f"            {it}" for it in f.items[:max_items]]
            if len(f.items) > max_items:
                lines.append(f"            ... and {len(f.items) - max_items} more")
        b, w = self.count("blocking"), self.count("warning")
        lines.append(f"result: {b} blocking problem(s), {w} warning(s)")
        return "\n".join(lines)


# -- perceptual hashing ---------------------------------------------------------------------------
def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a BGR image (robust to re-encoding, resizing and small edits)."""
    g = cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (32, 32), interpolation=cv2.INTER_AREA).astype(
        np.float32
    )
    d = cv2.dct(g)[:8, :8].flatten()
    bits = d > np.median(d[1:])
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def thumbnail(image: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm 32x32 grey thumbnail (confirms perceptual-hash matches)."""
    g = (
        cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
        .astype(np.float32)
        .ravel()
    )
    g -= g.mean()
    return g / max(float(np.linalg.norm(g)), 1e-6)


def near_duplicates(
    hashes: Sequence[int], thumbs: np.ndarray, max_bits: int = 8, min_corr: float = 0.98
) -> list[tuple[int, int, int]]:
    """Pairs (i, j, hamming distance) within ``max_bits`` whose thumbnails also correlate >= ``min_corr``.

    Re-encoded, resized or re-exposed copies correlate above 0.999; different scenes that merely share a
    layout (the same background and object position) stay below 0.95, which the hash alone cannot tell.
    """
    h = np.array(hashes, dtype=np.uint64)
    pairs = []
    for i in range(len(h) - 1):  # O(n^2 / 2) vectorised per row: fine for tens of thousands of images
        dist = np.bitwise_count(h[i + 1 :] ^ h[i])
        for j in np.flatnonzero(dist <= max_bits):
            k = i + 1 + int(j)
            if float(thumbs[i] @ thumbs[k]) >= min_corr:
                pairs.append((i, k, int(dist[j])))
    return pairs


# -- label errors ---------------------------------------------------------------------------------
def _probe_probabilities(
    features: np.ndarray, y: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Out-of-fold probabilities of a linear probe (full-batch Adam on standardised features), temperature-
    scaled on the out-of-fold logits: an uncalibrated probe is near 100% sure of everything."""
    import torch

    from trainer.evaluation.calibration import fit_temperature, softmax

    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(y)) % folds
    out = np.zeros((len(y), num_classes))
    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    for k in range(folds):
        tr, te = fold != k, fold == k
        if not te.any() or len(np.unique(y[tr])) < 2:
            continue
        torch.manual_seed(seed + k)
        lin = torch.nn.Linear(x.shape[1], num_classes)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
        xt, yt = torch.from_numpy(x[tr]).float(), torch.from_numpy(y[tr])
        for _ in range(150):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(xt), yt).backward()
            opt.step()
        with torch.no_grad():
            out[te] = lin(torch.from_numpy(x[te]).float()).numpy()
    return softmax(out, fit_temperature(out, y))


def _probe(
    samples: Sequence[Sample], frames: Sequence[np.ndarray], y: np.ndarray, num_classes: int
) -> np.ndarray:
    from trainer.model.backbone import build_classifier, split
    from trainer.model.features import FeatureExtractor
    from trainer.model.pretrained import LITE0_PREPROCESS

    prefix, _ = split(build_classifier(num_classes, 0), 0)
    feats = FeatureExtractor(prefix, LITE0_PREPROCESS.model_copy(update={"crop_fraction": 1.0}))(frames)
    return _probe_probabilities(feats, y, num_classes)


def _package_probabilities(
    package: ModelPackage, frames: Sequence[np.ndarray], labels: Sequence[str]
) -> np.ndarray:
    from trainer.evaluation.runners import ArtifactRunner, label_positions

    m = package.manifest
    key = next(
        (k for k in ("tflite-int8", "onnx-int8", "onnx-fp32", "tflite-fp32") if k in m.artifacts),
        next(iter(m.artifacts)),
    )
    cols = label_positions(labels, m.labels)
    run = ArtifactRunner(package, key)
    try:
        p = run(frames)
    finally:
        run.close()
    return p[:, cols] / np.clip(p[:, cols].sum(1, keepdims=True), 1e-12, None)


# -- the check ------------------------------------------------------------------------------------
def check_dataset(
    ds: Dataset,
    *,
    package: ModelPackage | None = None,
    min_class_images: int = 10,
    max_imbalance: float = 3.0,
    near_dup_bits: int = 8,
    disagreement: float = 0.9,
    label_check: bool = True,
) -> CheckReport:
    """Run every check on ``ds``; ``package`` is the current model for the label-error check."""
    counts = ds.counts()
    per_class = {lab: sum(counts[s][lab] for s in SPLITS) for lab in ds.labels}
    rep = CheckReport(
        ds.origin,
        {
            "images": len(ds.samples),
            "classes": len(ds.labels),
            "per_class": per_class,
            "per_split": {s: sum(counts[s].values()) for s in SPLITS},
            "skipped": len(ds.skipped),
            "licences": dict(Counter(s.licence for s in ds.samples)),
            "sources": dict(Counter(s.source for s in ds.samples)),
        },
    )
    _check_files(rep, ds)
    _check_classes(rep, ds, counts, per_class, min_class_images, max_imbalance)
    _check_exact_duplicates(rep, ds)
    frames = [s.frame() for s in ds.samples]
    _check_near_duplicates(rep, ds, frames, near_dup_bits)
    if label_check and len(ds.samples) >= 10 and len(ds.labels) >= 2:
        _check_labels(rep, ds, frames, package, disagreement)
    return rep


def _check_files(rep: CheckReport, ds: Dataset) -> None:
    """Files that could not be read (blocking) and files that are not images (info)."""
    corrupt = [k for k in ds.skipped if k.corrupt]
    if corrupt:
        rep.add(
            "blocking",
            "corrupt",
            f"{len(corrupt)} file(s) cannot be read or decoded (they are skipped; fix or delete them)",
            [f"{k.path}: {k.reason}" for k in corrupt],
        )
    ignored = [k for k in ds.skipped if not k.corrupt]
    if ignored:
        rep.add(
            "info",
            "ignored",
            f"{len(ignored)} non-image file(s) ignored",
            [f"{k.path}: {k.reason}" for k in ignored],
        )


def _check_classes(
    rep: CheckReport,
    ds: Dataset,
    counts: dict[str, dict[str, int]],
    per_class: dict[str, int],
    min_class_images: int,
    max_imbalance: float,
) -> None:
    """Empty, tiny and unsplit classes, classes missing from val or test, and imbalance."""
    empty = [lab for lab, n in per_class.items() if n == 0]
    if empty:
        rep.add("blocking", "empty-class", f"{len(empty)} class folder(s) without usable images", empty)
    if len([n for n in per_class.values() if n]) < 2:
        rep.add("blocking", "classes", "fewer than 2 classes with images: a classifier needs at least 2")
    tiny = [f"{lab}: {n}" for lab, n in per_class.items() if 0 < n < min_class_images]
    if tiny:
        rep.add(
            "blocking", "tiny-class", f"{len(tiny)} class(es) with fewer than {min_class_images} images", tiny
        )
    no_train = [lab for lab in ds.labels if per_class[lab] and counts["train"][lab] == 0]
    if no_train:
        rep.add(
            "blocking",
            "split",
            "class(es) without any training image after the content-hash split; add images",
            no_train,
        )
    for s in ("val", "test"):
        missing = [lab for lab in ds.labels if per_class[lab] and counts[s][lab] == 0]
        if missing:
            rep.add(
                "warning", "split", f"class(es) without {s} images: their {s} metrics are undefined", missing
            )
    present = [n for n in per_class.values() if n]
    if present and max(present) > max_imbalance * min(present):
        rep.add(
            "warning",
            "imbalance",
            f"largest class has {max(present) / min(present):.1f}x the images of the smallest "
            f"(training weights the loss by inverse class frequency)",
            [f"{k}: {v}" for k, v in per_class.items()],
        )


def _check_exact_duplicates(rep: CheckReport, ds: Dataset) -> None:
    """Byte-identical images: under different labels (blocking) or repeated (warning)."""
    by_sha: dict[str, list[Sample]] = defaultdict(list)
    for sample in ds.samples:
        by_sha[sample.sha256].append(sample)
    conflicts = [g for g in by_sha.values() if len({x.label for x in g}) > 1]
    dupes = [g for g in by_sha.values() if len(g) > 1 and len({x.label for x in g}) == 1]
    if conflicts:
        rep.add(
            "blocking",
            "duplicate-conflict",
            f"{len(conflicts)} identical image(s) under different labels",
            [" = ".join(f"{s.name} ({s.label})" for s in g) for g in conflicts],
        )
    if dupes:
        rep.add(
            "warning",
            "duplicate",
            f"{len(dupes)} image(s) present more than once (same split, same label)",
            [" = ".join(s.name for s in g) for g in dupes],
        )


def _check_near_duplicates(
    rep: CheckReport, ds: Dataset, frames: list[np.ndarray], near_dup_bits: int
) -> None:
    """Perceptual near-duplicates across splits (leakage, blocking) or under different labels."""
    hashes = [phash(f) for f in frames]
    thumbs = np.stack([thumbnail(f) for f in frames]) if frames else np.zeros((0, 256), np.float32)
    leaks, near_conflicts = [], []
    for i, j, d in near_duplicates(hashes, thumbs, near_dup_bits):
        a, b = ds.samples[i], ds.samples[j]
        if a.sha256 == b.sha256:
            continue  # exact duplicates are reported above
        text = f"{a.name} ({a.split}, {a.label}) ~ {b.name} ({b.split}, {b.label}): {d} bits apart"
        if a.split != b.split:
            leaks.append(text)
        elif a.label != b.label:
            near_conflicts.append(text)
    if leaks:
        rep.add(
            "blocking",
            "leakage",
            f"{len(leaks)} near-duplicate pair(s) across splits (remove one of each pair)",
            leaks,
        )
    if near_conflicts:
        rep.add(
            "warning",
            "near-duplicate-conflict",
            f"{len(near_conflicts)} near-duplicate pair(s) with different labels",
            near_conflicts,
        )


def _check_labels(
    rep: CheckReport, ds: Dataset, frames: list[np.ndarray], package: ModelPackage | None, disagreement: float
) -> None:
    """Images whose label a model (the package, else an out-of-fold probe) strongly disagrees with."""
    y = ds.index(ds.samples)
    if package is not None:
        probs, who = (
            _package_probabilities(package, frames, ds.labels),
            f"{package.manifest.name} {package.manifest.version}",
        )
    else:
        probs, who = (
            _probe(ds.samples, frames, y, len(ds.labels)),
            "an out-of-fold linear probe on Lite0 features",
        )
    pred = probs.argmax(1)
    suspects = [
        (
            float(probs[i, pred[i]]),
            f"{s.name}: labelled {s.label}, {who} says {ds.labels[pred[i]]} ({probs[i, pred[i]]:.0%}; "
            f"{probs[i, y[i]]:.0%} for {s.label})",
        )
        for i, s in enumerate(ds.samples)
        if pred[i] != y[i] and probs[i, pred[i]] >= disagreement
    ]
    if suspects:
        rep.add(
            "warning",
            "label",
            f"{len(suspects)} image(s) whose label the model strongly disagrees with (check them)",
            [t for _, t in sorted(suspects, reverse=True)],
        )
