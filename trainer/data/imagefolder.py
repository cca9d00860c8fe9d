"""The user's dataset format: an ImageFolder directory (one sub-folder per class) with optional metadata.

::

    DIR/
      metadata.csv          optional: file,source,licence,<any slice key: domain, device, lighting...>
      cat/0001.jpg
      dog/0001.png

``metadata.csv`` rows name files relative to DIR (``cat/0001.jpg``); its ``source`` and ``licence``
columns (licence or consent tag) override the defaults, every other column becomes slice metadata for
evaluation. Unreadable or undecodable images are skipped and listed, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path

from trainer.data.dataset import DEFAULT_FRACTIONS, Dataset, Sample, Skipped, decode_image, split_of
from trainer.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
METADATA = "metadata.csv"
_RESERVED = {"file", "source", "licence", "license"}


def _read_metadata(root: Path) -> dict[str, dict[str, str]]:
    path = root / METADATA
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "file" not in reader.fieldnames:
            raise DataError(f"{path}: needs a header row with a 'file' column (file,source,licence,...)")
        rows = {}
        for n, row in enumerate(reader, start=2):
            name = (row.get("file") or "").strip()
            if not name:
                raise DataError(f"{path}:{n}: empty 'file' value")
            rows[Path(name).as_posix()] = {k: (v or "").strip() for k, v in row.items() if k is not None}
        return rows


def load_imagefolder(
    root: str | Path,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    source: str | None = None,
    licence: str = "unspecified",
    max_side: int | None = 640,
) -> Dataset:
    """Read and hash every image under ``root/<class>/``; corrupt files are listed in ``skipped``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset directory does not exist")
    metadata = _read_metadata(root)
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise DataError(f"{root}: no class folders; expected one sub-folder per class (ImageFolder layout)")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise DataError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name != METADATA and not p.name.startswith("."):
            skipped.append(Skipped(p.name, "outside the class folders", corrupt=False))
    for label in labels:
        for p in sorted((root / label).rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            rel = p.relative_to(root).as_posix()
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(
                    Skipped(rel, f"not an image file ({p.suffix or 'no extension'})", corrupt=False)
                )
                continue
            try:
                data = p.read_bytes()
            except OSError as exc:
                skipped.append(Skipped(rel, f"unreadable: {exc.strerror or exc}"))
                continue
            if decode_image(data, max_side=64) is None:  # a cheap full decode check
                skipped.append(Skipped(rel, "cannot be decoded as an image (corrupt or truncated)"))
                continue
            sha = hashlib.sha256(data).hexdigest()
            row = metadata.get(rel, {})
            meta = {k: v for k, v in row.items() if k not in _RESERVED and v != ""}
            samples.append(
                Sample(
                    sha,
                    label,
                    split_of(sha, fractions),
                    source=row.get("source") or source or f"folder:{root.name}",
                    licence=row.get("licence") or row.get("license") or licence,
                    meta=meta,
                    path=p,
                    file=rel,
                    max_side=max_side,
                )
            )
    return Dataset(labels, samples, origin=str(root), fractions=fractions, skipped=skipped)
