"""The labelling queue: sample frames from devices -> labels (people via CSV, or the simulator's oracle).

``edgefleet labels export --out queue.csv`` writes the unlabelled samples (with their images beside the
CSV) for people to fill in the ``label`` column; ``edgefleet labels import queue.csv`` reads it back.
Every label records who gave it. Labelled samples become training data with their provenance (device,
time, model, consent policy, sha256) carried into the dataset manifest.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.reference import ReferenceStats
from trainer.data.dataset import Dataset, decode_image, sample_from_image
from trainer.data.phash import dhash
from trainer.data.screening import FieldLabel, ScreenReport, ScreenRules, screen_field
from trainer.drift.accuracy import audit_label
from trainer.drift.ppi import AuditLabel
from trainer.errors import LabelImportError
from trainer.store import Store
from trainer.store.console_queries import flagged_sample_ids

CSV_FIELDS = ("sample_id", "device", "ts", "reason", "predicted", "image", "label")


def _provenance(sample: Any) -> dict[str, Any]:
    try:
        return json.loads(sample.provenance) if sample.provenance else {}
    except json.JSONDecodeError:
        return {}


def export_queue(store: Store, out_csv: Path, labels: Sequence[str], limit: int | None = None) -> int:
    """Write the unlabelled samples to ``out_csv`` (images in ``<csv stem>_images/``); returns how many."""
    images = out_csv.with_name(out_csv.stem + "_images")
    images.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for s in store.unlabelled_samples(limit):
            prov = _provenance(s)
            name = f"{s.id:06d}-{s.sha256[:12]}.jpg"
            if s.image is not None:
                (images / name).write_bytes(s.image)
            top = prov.get("top") or []
            predicted = labels[top[0][0]] if top and 0 <= top[0][0] < len(labels) else ""
            w.writerow(
                [
                    s.id,
                    s.device,
                    f"{s.ts:.3f}",
                    prov.get("reason", ""),
                    predicted,
                    f"{images.name}/{name}",
                    "",
                ]
            )
            n += 1
    return n


def import_labels(store: Store, csv_path: Path, labels: Sequence[str], labeller: str) -> int:
    """Store the labels filled in a queue CSV, all or nothing; returns how many were new.

    Empty labels are skipped; an unknown label, a missing or malformed sample id, a sample that does not
    exist, a row with too few or too many cells, or one sample given two labels fails the whole file
    naming the line. Importing the same file again stores nothing (a label equal to the sample's newest
    label is not stacked)."""
    rows = read_label_rows(csv_path, labels)
    found = store.sample_ids_present(rows)
    for sid, (_, line) in rows.items():
        if sid not in found:
            raise LabelImportError(f"{csv_path}:{line}: no sample with id {sid}")
    pairs = [(sid, lab) for sid, (lab, _) in rows.items()]
    return store.add_labels(pairs, source="human", labeller=labeller)


def read_label_rows(csv_path: Path, labels: Sequence[str]) -> dict[int, tuple[str, int]]:
    """``{sample_id: (label, line)}`` of the labelled rows; LabelImportError naming the first bad line."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            return _label_rows(csv.DictReader(f), csv_path, labels)
    except UnicodeDecodeError as exc:
        raise LabelImportError(f"{csv_path}: not UTF-8 text (byte {exc.start})") from None
    except csv.Error as exc:
        raise LabelImportError(f"{csv_path}: not a CSV file ({exc})") from None


def _label_rows(reader: csv.DictReader, csv_path: Path, labels: Sequence[str]) -> dict[int, tuple[str, int]]:
    known = set(labels)
    out: dict[int, tuple[str, int]] = {}
    missing = {"sample_id", "label"} - set(reader.fieldnames or [])
    if missing:
        raise LabelImportError(f"{csv_path}: missing column(s) {sorted(missing)}")
    for row in reader:
        line = reader.line_num
        if None in row or None in row.values():
            raise LabelImportError(f"{csv_path}:{line}: {len(reader.fieldnames or [])} cells expected")
        label = (row["label"] or "").strip()
        if not label:
            continue
        if label not in known:
            raise LabelImportError(
                f"{csv_path}:{line}: unknown label {label!r} (labels: {', '.join(labels)})"
            )
        sid = _sample_id(row["sample_id"])
        if sid is None:
            raise LabelImportError(
                f"{csv_path}:{line}: sample_id {row['sample_id'][:40]!r} is not a sample id"
            )
        if sid in out and out[sid][0] != label:
            raise LabelImportError(
                f"{csv_path}:{line}: sample {sid} is labelled {out[sid][0]!r} on line {out[sid][1]} already"
            )
        out.setdefault(sid, (label, line))
    return out


def _sample_id(text: str) -> int | None:
    """A positive 64-bit integer, or None."""
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    sid = int(text)
    return sid if 0 < sid < 2**63 else None


def label_with(
    store: Store,
    labeller: Callable[[dict[str, Any]], str | None],
    names: Sequence[str],
    limit: int | None = None,
) -> int:
    """Label the queue with a function of each sample's provenance (the simulator's oracle), recorded
    as ``names`` in turn by sample id: a simulated team, so the labeller share cap applies as it would
    to several people."""
    n = 0
    for s in store.unlabelled_samples(limit):
        label = labeller({**_provenance(s), "device": s.device})
        if label is not None:
            store.add_label(s.id, label, source="oracle", labeller=names[s.id % len(names)])
            n += 1
    return n


@dataclass(frozen=True)
class FieldData:
    dataset: Dataset
    devices: dict[str, int]
    """Field samples kept, per device."""
    screen: ScreenReport = field(default_factory=ScreenReport)
    """What the poisoning defences dropped or held for review, and why."""


def field_dataset(
    store: Store,
    labels: Sequence[str],
    *,
    since: float | None = None,
    devices: set[str] | None = None,
    base_size: int | None = None,
    rules: ScreenRules | None = None,
) -> FieldData:
    """Labelled field samples as a dataset (``origin=field`` slice), newest label per sample wins,
    screened (:func:`~trainer.data.screening.screen_field`; the share caps hold on the set trained on:
    ``base_size`` original images, or none, plus the field samples kept); each kept sample records its
    provenance (sample id, device, labeller, when)."""
    newest = {lab.sample_id: lab for lab in store.labels()}  # ordered by id: the last one wins
    for sid in flagged_sample_ids(store):  # a person marked it unusable (console): never trained on
        newest.pop(sid, None)
    candidates: dict[int, tuple[Any, np.ndarray]] = {}
    items: list[FieldLabel] = []
    for s in store.samples(ids=list(newest)):
        lab = newest[s.id]
        if (since is not None and s.ts < since) or (devices is not None and s.device not in devices):
            continue
        img = decode_image(s.image) if s.image is not None else None  # header checked before decoding
        if img is None or lab.label not in labels:
            continue
        top = _provenance(s).get("top") or []
        predicted = labels[top[0][0]] if top and 0 <= top[0][0] < len(labels) else None
        confidence = float(top[0][1]) if top else None
        who = lab.labeller or lab.source
        items.append(
            FieldLabel(s.id, s.device, who, lab.label, lab.created_at, dhash(img), predicted, confidence)
        )
        candidates[s.id] = (s, img)
    report = screen_field(items, base_size, rules or ScreenRules())
    by_id = {i.sample_id: i for i in items}
    samples = []
    per_device: dict[str, int] = {}
    for sid in report.kept:
        s, img = candidates[sid]
        it = by_id[sid]
        prov = {
            "sample_id": str(sid),
            "device": s.device,
            "labeller": it.labeller,
            "labelled_at": f"{it.labelled_at:.3f}",
        }
        samples.append(
            sample_from_image(
                img,
                it.label,
                source=f"field:{s.device}",
                licence=s.consent_policy,
                meta={"origin": "field", "device": s.device},
                provenance=prov,
            )
        )
        per_device[s.device] = per_device.get(s.device, 0) + 1
    dataset = Dataset(labels=list(labels), samples=samples, origin="field samples")
    return FieldData(dataset, per_device, report)


def audit_labels(
    store: Store,
    *,
    model_sha256: str,
    labels: Sequence[str],
    reference: ReferenceStats | None,
    since: float | None = None,
    until: float | None = None,
    device: str | None = None,
) -> dict[str, list[AuditLabel]]:
    """The labelled **audit** samples of one model in ``[since, until)`` (device time), per device, as
    (time, top-1 right or not, label-free score, weight) for the prediction-powered accuracy estimate.
    Only ``reason == "audit"`` samples qualify: the others were chosen for low confidence (or under
    drift) and are not a random draw of what the device saw. The newest label of a sample wins; the
    predicted top-1 and its confidence come from the sample's ``top`` list."""
    audit = [
        (s, prov)
        for s in store.samples(device=device, since=since)
        if s.model_sha256 == model_sha256
        and (until is None or s.ts < until)
        and (prov := _provenance(s)).get("reason") == "audit"
        and prov.get("top")
    ]
    newest: dict[int, str] = {}
    for lab in store.labels([s.id for s, _ in audit]) if audit else []:
        newest[lab.sample_id] = lab.label
    for sid in flagged_sample_ids(store) if audit else ():  # unusable: its label says nothing
        newest.pop(sid, None)
    out: dict[str, list[AuditLabel]] = {}
    for s, prov in audit:
        label = newest.get(s.id)
        if label is None or label not in labels:
            continue
        predicted, confidence = int(prov["top"][0][0]), float(prov["top"][0][1])
        out.setdefault(s.device, []).append(
            audit_label(
                ts=s.ts,
                correct=labels.index(label) == predicted,
                confidence=confidence,
                reference=reference,
                inclusion=float(prov.get("inclusion") or 1.0),
            )
        )
    return out
