"""Labelled images, their manifest, and content-hash splits.

Every sample is identified by the sha256 of its content (the file's bytes, or the pixels of an
in-memory frame). Its split is a pure function of that hash (:func:`split_of`), so adding images never
moves an existing image between train, validation and test, and two datasets that share an image
always put it in the same split: a model's test images stay unseen by every later model trained on a
superset of its data (the fleet loop retrains on original + new data).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.image_header import ImageHeaderError, check_image_size
from trainer.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)


def split_of(sha256: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of an image with this content hash: stable under additions to the dataset."""
    u = int(sha256[:16], 16) / float(1 << 64)
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def image_sha256(image: np.ndarray) -> str:
    """Content hash of an in-memory frame (shape, dtype and pixels)."""
    h = hashlib.sha256(f"{image.shape}:{image.dtype}:".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def decode_image(data: bytes, max_side: int | None = None) -> np.ndarray | None:
    """Decode image bytes to BGR uint8 (None when undecodable or when the header declares more pixels than
    MAX_IMAGE_PIXELS: such a file is never decoded), bounded to ``max_side`` pixels."""
    arr = np.frombuffer(data, np.uint8)
    try:
        check_image_size(data)
        img = cv2.imdecode(arr, cv2.IMREAD_COLOR) if arr.size else None
    except (cv2.error, ImageHeaderError):
        img = None
    if img is None or img.size == 0 or min(img.shape[:2]) < 2:
        return None
    if max_side and max(img.shape[:2]) > max_side:
        s = max_side / max(img.shape[:2])
        img = cv2.resize(
            img,
            (max(2, round(img.shape[1] * s)), max(2, round(img.shape[0] * s))),
            interpolation=cv2.INTER_AREA,
        )
    return img


@dataclass(frozen=True)
class Sample:
    """One labelled image: a file (decoded on demand) or an in-memory BGR frame."""

    sha256: str
    label: str
    split: str
    source: str = "unknown"
    licence: str = "unspecified"
    meta: Mapping[str, str] = field(default_factory=dict)
    provenance: Mapping[str, str] = field(default_factory=dict)
    """Where a field label came from (sample id, device, labeller, when); recorded, never sliced on."""
    path: Path | None = None
    file: str | None = None
    """Path relative to the dataset directory (what the manifest records)."""
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    max_side: int | None = 640

    def frame(self) -> np.ndarray:
        """The BGR uint8 frame (files are decoded and bounded to ``max_side``, as at load time)."""
        if self.image is not None:
            return self.image
        assert self.path is not None
        img = decode_image(self.path.read_bytes(), self.max_side)
        if img is None:
            raise DataError(f"{self.path}: no longer decodable (changed since the dataset was loaded?)")
        return img

    @property
    def name(self) -> str:
        return self.file or (str(self.path) if self.path is not None else f"{self.source}:{self.sha256[:12]}")


def sample_from_image(
    image: np.ndarray,
    label: str,
    *,
    source: str,
    licence: str = "unspecified",
    meta: Mapping[str, str] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    provenance: Mapping[str, str] | None = None,
) -> Sample:
    """An in-memory sample (a rendered frame or a labelled field sample) with its content split."""
    sha = image_sha256(image)
    return Sample(
        sha,
        label,
        split_of(sha, fractions),
        source,
        licence,
        dict(meta or {}),
        dict(provenance or {}),
        image=image,
    )


@dataclass(frozen=True)
class Skipped:
    """A file that could not be used, and why."""

    path: str
    reason: str
    corrupt: bool = True
    """False for files that are merely not images (a README in a class folder)."""


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    label: str
    split: str
    source: str
    licence: str
    meta: dict[str, str] = Field(default_factory=dict)
    provenance: dict[str, str] = Field(default_factory=dict)
    """Field labels: sample id, device, labeller and when it was labelled."""


class DatasetManifest(BaseModel):
    """Per image: sha256, label, split, source, licence/consent tag and slice metadata."""

    model_config = ConfigDict(extra="forbid")
    format: str = "edgefleet.dataset/1"
    origin: str
    labels: list[str]
    split_fractions: tuple[float, float, float]
    entries: list[ManifestEntry]
    skipped: list[dict[str, str]] = Field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """Counts per split and class, sources, licences and metadata keys (for the model card)."""
        per = {s: Counter(e.label for e in self.entries if e.split == s) for s in SPLITS}
        return {
            "origin": self.origin,
            "images": len(self.entries),
            "skipped": len(self.skipped),
            "split_fractions": list(self.split_fractions),
            "per_split": {s: {lab: per[s].get(lab, 0) for lab in self.labels} for s in SPLITS},
            "sources": dict(Counter(e.source for e in self.entries)),
            "licences": dict(Counter(e.licence for e in self.entries)),
            "meta_keys": sorted({k for e in self.entries for k in e.meta}),
        }

    def added_since(self, before: DatasetManifest) -> dict[str, object]:
        """What this training set has that ``before`` (the champion's) did not: images per device (or
        source) and class, and per labeller; the model card's training-set diff."""
        old = {e.sha256 for e in before.entries}
        new = [e for e in self.entries if e.sha256 not in old]
        by_device: dict[str, Counter[str]] = {}
        for e in new:
            by_device.setdefault(e.meta.get("device") or e.source, Counter())[e.label] += 1
        return {
            "images": len(new),
            "removed": len(old - {e.sha256 for e in self.entries}),
            "by_device": {d: dict(c) for d, c in sorted(by_device.items())},
            "labellers": dict(Counter(e.provenance["labeller"] for e in new if "labeller" in e.provenance)),
        }


@dataclass
class Dataset:
    """An ordered label set and its samples (plus files that were skipped while loading)."""

    labels: list[str]
    samples: list[Sample]
    origin: str = "memory"
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    skipped: list[Skipped] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r} (known: {SPLITS})")
        return [s for s in self.samples if s.split == name]

    def index(self, samples: Iterable[Sample]) -> np.ndarray:
        """Class indices of ``samples`` in this dataset's label order."""
        pos = {lab: i for i, lab in enumerate(self.labels)}
        return np.array([pos[s.label] for s in samples], dtype=np.int64)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        out = {s: dict.fromkeys(self.labels, 0) for s in SPLITS}
        for s in self.samples:
            out[s.split][s.label] += 1
        return out

    def manifest(self) -> DatasetManifest:
        return DatasetManifest(
            origin=self.origin,
            labels=list(self.labels),
            split_fractions=self.fractions,
            entries=[
                ManifestEntry(
                    file=s.file,
                    sha256=s.sha256,
                    label=s.label,
                    split=s.split,
                    source=s.source,
                    licence=s.licence,
                    meta=dict(s.meta),
                    provenance=dict(s.provenance),
                )
                for s in self.samples
            ],
            skipped=[{"path": k.path, "reason": k.reason} for k in self.skipped],
        )

    def combine(self, other: Dataset) -> Dataset:
        """This dataset plus ``other`` (e.g. newly labelled field samples); duplicates by sha256 are
        kept once. ``other`` may cover only some classes but must not bring new ones."""
        new = sorted(set(other.labels) - set(self.labels))
        if new:
            raise DataError(
                f"{other.origin} has classes {new} that {self.origin} does not have; "
                "a retraining run keeps the label set (train a new model for new classes)"
            )
        if tuple(other.fractions) != tuple(self.fractions):
            raise DataError(f"split fractions differ: {self.fractions} vs {other.fractions}")
        seen = {s.sha256 for s in self.samples}
        extra = [s for s in other.samples if s.sha256 not in seen]
        return Dataset(
            list(self.labels),
            self.samples + extra,
            f"{self.origin} + {other.origin}",
            self.fractions,
            self.skipped + other.skipped,
        )

    def require_trainable(self, min_train_per_class: int = 2, min_eval: int = 4) -> None:
        """Raise :class:`DataError` saying what to fix unless this dataset can be trained and evaluated."""
        where = self.origin
        counts = self.counts()
        totals = {lab: sum(counts[s][lab] for s in SPLITS) for lab in self.labels}
        empty = [lab for lab, n in totals.items() if n == 0]
        if empty:
            raise DataError(
                f"{where}: class(es) {empty} have no usable image; add images or remove the class folder"
            )
        if len(self.labels) < 2:
            raise DataError(
                f"{where}: only one class ({self.labels[0] if self.labels else 'none'}); a classifier needs at "
                "least 2 class folders with images"
            )
        short = [
            f"{lab} ({counts['train'][lab]} of {totals[lab]})"
            for lab in self.labels
            if counts["train"][lab] < min_train_per_class
        ]
        if short:
            raise DataError(
                f"{where}: too small to split: class(es) {', '.join(short)} have fewer than {min_train_per_class} "
                f"training images after the content-hash split ({self.fractions}); add images to these classes "
                f"(about {int(np.ceil(min_train_per_class / self.fractions[0])) + 2} or more each)"
            )
        for name in ("val", "test"):
            n = sum(counts[name].values())
            if n < min_eval:
                total = len(self.samples)
                raise DataError(
                    f"{where}: too small to split: the {name} split has {n} image(s) (need at least {min_eval}) "
                    f"out of {total}; add images (about {int(np.ceil(min_eval / min(self.fractions[1:]) * 1.5))} or more in total)"
                )
