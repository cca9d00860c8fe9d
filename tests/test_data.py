"""Datasets: content-hash splits, ImageFolder with metadata, the built-in dataset, and ``data check``."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.cli import main as edgefleet
from trainer.data import (
    builtin_dataset,
    load_dataset,
    load_imagefolder,
    parse_builtin,
    split_of,
    write_imagefolder,
)
from trainer.data.scenes import BASE_DOMAINS, CLASSES, Domain, render_frame
from trainer.errors import DataError
from trainer.evaluation.data_check import check_dataset, phash


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class ImageFolder written from the built-in dataset (PNG files + metadata.csv)."""
    return write_imagefolder(
        builtin_dataset("builtin:shapes?n=16&classes=circle+square+star"),
        tmp_path_factory.mktemp("d") / "shapes",
    )


def test_split_is_a_function_of_content_with_the_requested_proportions() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(6000)]
    splits = [split_of(h) for h in hashes]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert share["train"] == pytest.approx(0.7, abs=0.02) and share["val"] == pytest.approx(0.15, abs=0.015)
    assert [split_of(h) for h in hashes] == splits
    assert split_of(hashes[0], (0.5, 0.25, 0.25)) in ("train", "val", "test")


def test_splits_stay_stable_when_files_are_added(folder: Path, tmp_path: Path) -> None:
    before = {s.file: (s.split, s.sha256) for s in load_imagefolder(folder).samples}
    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    extra = builtin_dataset("builtin:shapes?n=40&classes=circle+square+star&seed=5")
    for n, s in enumerate(extra.samples):  # 120 new images, some into a new metadata-less state
        cv2.imwrite(str(grown / s.label / f"new{n:03d}.png"), s.frame())
    after = {s.file: (s.split, s.sha256) for s in load_imagefolder(grown).samples}
    assert len(after) == len(before) + 120
    assert all(after[f] == v for f, v in before.items()), "an existing image changed split"
    # the built-in dataset grows the same way: more images per class keep the earlier ones
    small, big = builtin_dataset("builtin:shapes?n=5"), builtin_dataset("builtin:shapes?n=9")
    big_by_sha = {s.sha256: s.split for s in big.samples}
    assert all(big_by_sha[s.sha256] == s.split for s in small.samples)


def test_imagefolder_reads_metadata_skips_corrupt_files_and_builds_a_manifest(
    folder: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    (root / "star" / "truncated.png").write_bytes((root / "star" / "00040.png").read_bytes()[:200])
    (root / "star" / "empty.jpg").write_bytes(b"")
    (root / "circle" / "notes.txt").write_text("not an image")
    with open(root / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["licence"] = "consent:opt-in-2026"
    rows[0]["source"] = "camera-12"
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ds = load_imagefolder(root, licence="CC-BY-4.0")
    assert ds.labels == ["circle", "square", "star"] and len(ds.samples) == 48
    skipped = {k.path: k for k in ds.skipped}
    assert skipped["star/truncated.png"].corrupt and skipped["star/empty.jpg"].corrupt
    assert not skipped["circle/notes.txt"].corrupt
    first = next(s for s in ds.samples if s.file == rows[0]["file"])
    assert (first.source, first.licence) == ("camera-12", "consent:opt-in-2026")
    assert first.meta["lighting"] in ("day", "dusk") and "domain" in first.meta
    manifest = ds.manifest()
    entry = next(e for e in manifest.entries if e.file == rows[0]["file"])
    assert entry.sha256 == hashlib.sha256((root / entry.file).read_bytes()).hexdigest()
    summary = manifest.summary()
    assert summary["images"] == 48 and summary["skipped"] == 3
    assert summary["licences"]["consent:opt-in-2026"] == 1
    assert sum(summary["per_split"]["train"].values()) + sum(summary["per_split"]["test"].values()) <= 48


def test_builtin_dataset_is_deterministic_has_domains_and_parses_options() -> None:
    a, b = builtin_dataset("builtin:shapes?n=3"), builtin_dataset("builtin:shapes?n=3")
    assert [s.sha256 for s in a.samples] == [s.sha256 for s in b.samples]
    assert len(a.samples) == 3 * len(CLASSES) and a.labels == list(CLASSES)
    assert {s.meta["domain"] for s in builtin_dataset("builtin:shapes?n=12").samples} <= {
        d.name for d in BASE_DOMAINS
    }
    spec = parse_builtin(
        "builtin:shapes?n=7&seed=2&size=640x480&classes=star+circle&lighting=night&sensor=noisy+soft"
    )
    assert spec.per_class == 7 and spec.size == (640, 480) and spec.classes == ("star", "circle")
    assert {d.lighting for d in spec.domains} == {"night"} and {d.sensor for d in spec.domains} == {
        "noisy",
        "soft",
    }
    frame = render_frame(
        "star", Domain(lighting="night", background="clutter"), np.random.default_rng(0), (640, 480)
    )
    assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
    assert (
        frame.mean() < render_frame("star", Domain(), np.random.default_rng(0), (640, 480)).mean()
    )  # night is darker
    for bad in ("builtin:faces", "builtin:shapes?lighting=moon", "builtin:shapes?n=x"):
        with pytest.raises(DataError):
            parse_builtin(bad)
    with pytest.raises(ValueError):
        Domain(sensor="thermal")


def test_combining_datasets_keeps_splits_and_refuses_new_classes() -> None:
    base = builtin_dataset("builtin:shapes?n=4&classes=circle+square")
    night = builtin_dataset("builtin:shapes?n=4&classes=circle&lighting=night")
    both = base.combine(night)
    assert len(both.samples) == 12 and both.labels == ["circle", "square"]
    assert {s.sha256: s.split for s in both.samples} == {
        s.sha256: s.split for s in base.samples + night.samples
    }
    assert len(both.combine(night).samples) == 12  # duplicates by content are kept once
    with pytest.raises(DataError, match="does not have"):
        base.combine(builtin_dataset("builtin:shapes?n=2&classes=star"))


def test_data_check_finds_planted_problems(folder: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    (root / "star" / "broken.png").write_bytes((root / "star" / "00040.png").read_bytes()[:300])
    # a re-encoded copy of a training image that lands in another split: leakage
    src = next(s for s in load_imagefolder(root).samples if s.split == "train" and s.label == "circle")
    img = cv2.imread(str(src.path))
    for q in range(95, 40, -1):
        buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes()
        if split_of(hashlib.sha256(buf).hexdigest()) != "train":
            break
    (root / "circle" / "copy.jpg").write_bytes(buf)
    # a circle filed under "square": a label error
    mislabelled = next(p for p in sorted((root / "circle").glob("*.png")) if p.name != src.path.name)
    shutil.move(mislabelled, root / "square" / "was_a_circle.png")
    report = check_dataset(load_imagefolder(root))
    kinds = {f.kind: f for f in report.findings}
    assert kinds["corrupt"].severity == "blocking" and "star/broken.png" in kinds["corrupt"].items[0]
    assert kinds["leakage"].severity == "blocking" and "circle/copy.jpg" in kinds["leakage"].items[0]
    assert kinds["label"].severity == "warning" and kinds["label"].items[0].startswith(
        "square/was_a_circle.png: labelled square"
    )
    assert report.failed()
    assert edgefleet(["data", "check", str(root), "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "BLOCKING  leakage" in out and "result: 2 blocking problem(s)" in out
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["images"] == 49


def test_data_check_passes_clean_data_and_flags_small_or_unbalanced_sets(tmp_path: Path) -> None:
    clean = check_dataset(load_dataset("builtin:shapes?n=20&classes=circle+star+triangle"))
    assert not clean.failed(), clean.to_text()
    assert not [f for f in clean.findings if f.kind in ("leakage", "duplicate", "near-duplicate-conflict")]
    unbalanced = builtin_dataset("builtin:shapes?n=40&classes=circle+star")
    unbalanced.samples = [s for s in unbalanced.samples if s.label == "circle" or s.sha256 < "3"][:52]
    rep = check_dataset(unbalanced, label_check=False)
    kinds = {f.kind: f.severity for f in rep.findings}
    assert kinds.get("tiny-class") == "blocking" and kinds.get("imbalance") == "warning"
    assert phash(np.zeros((40, 40, 3), np.uint8)) == phash(np.zeros((80, 80, 3), np.uint8))
