"""Poisoning defences for field labels: what may enter a training set from the fleet, and why not.

Labelled field samples come from devices (one may be compromised, or just stuck on one scene) and from
labellers (one may be careless or hostile). Before a retraining run uses them, :func:`screen_field`
applies, in order:

1. near-duplicates: a sample whose perceptual hash is within ``duplicate_bits`` of an earlier kept one
   is dropped; if the two carry different labels both are held for review (a relabelled copy is the
   cheapest poison there is);
2. labeller outliers: on samples the serving model classified confidently (top-1 probability at least
   ``confident``), a labeller who disagrees with it ``outlier_margin`` more often than the other
   labellers together (with at least ``min_confident`` such samples) has every label held for review;
3. caps: no device and no labeller may contribute more than ``max_device_share`` /
   ``max_labeller_share`` of the whole training set (original data included); the newest beyond the
   cap are dropped.

Pure logic: records in, a :class:`ScreenReport` out (kept sample ids, each dropped or held sample with
its reason, per-labeller disagreement rates).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from trainer.data.phash import hamming


class ScreenRules(BaseModel):
    """Limits of :func:`screen_field` (``screen:`` in a retraining spec)."""

    model_config = ConfigDict(extra="forbid")
    max_device_share: float = Field(default=0.25, gt=0, le=1)
    max_labeller_share: float = Field(default=0.5, gt=0, le=1)
    duplicate_bits: int = Field(default=4, ge=0, le=32)
    confident: float = Field(default=0.9, gt=0, le=1)
    min_confident: int = Field(default=10, ge=1)
    outlier_margin: float = Field(default=0.3, gt=0, le=1)


@dataclass(frozen=True)
class FieldLabel:
    """One labelled field sample as the screen sees it."""

    sample_id: int
    device: str
    labeller: str
    label: str
    labelled_at: float
    dhash: int
    predicted: str | None = None
    """The serving model's top-1 when the device sent it (from the sample's provenance)."""
    confidence: float | None = None


@dataclass
class ScreenReport:
    """What the screen kept, and each sample it dropped or held for review with the reason."""

    kept: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    review: dict[int, str] = field(default_factory=dict)
    """Held for a person to look at (conflicting duplicates, outlier labellers); not trained on."""
    disagreement: dict[str, float] = field(default_factory=dict)
    """Per labeller: share of confidently-predicted samples labelled otherwise."""

    def summary(self) -> dict[str, object]:
        return {
            "kept": len(self.kept),
            "dropped": dict(Counter(r.split(":")[0] for r in self.dropped.values())),
            "review": dict(Counter(r.split(":")[0] for r in self.review.values())),
            "labeller_disagreement": {k: round(v, 3) for k, v in sorted(self.disagreement.items())},
        }


def screen_field(items: Sequence[FieldLabel], base_size: int | None, rules: ScreenRules) -> ScreenReport:
    """Apply the near-duplicate, labeller-outlier and share checks (see the module docstring); the
    share caps need the size of the original data (``base_size``; None: no training set, no caps)."""
    report = ScreenReport()
    ordered = sorted(items, key=lambda i: (i.labelled_at, i.sample_id))
    survivors = _drop_near_duplicates(ordered, rules.duplicate_bits, report)
    survivors = _hold_outlier_labellers(survivors, rules, report)
    if base_size is None:
        report.kept = [i.sample_id for i in survivors]
        return report
    survivors = _cap(survivors, lambda i: i.device, rules.max_device_share, base_size, "device_cap", report)
    survivors = _cap(
        survivors, lambda i: i.labeller, rules.max_labeller_share, base_size, "labeller_cap", report
    )
    report.kept = [i.sample_id for i in survivors]
    return report


def _drop_near_duplicates(items: list[FieldLabel], bits: int, report: ScreenReport) -> list[FieldLabel]:
    kept: list[FieldLabel] = []
    for it in items:
        twin = next((k for k in kept if hamming(k.dhash, it.dhash) <= bits), None)
        if twin is None:
            kept.append(it)
        elif twin.label == it.label:
            report.dropped[it.sample_id] = f"near_duplicate: of sample {twin.sample_id}"
        else:
            why = f"conflicting_duplicate: samples {twin.sample_id} ({twin.label}) and {it.sample_id} ({it.label})"
            report.review[it.sample_id] = why
            report.review[twin.sample_id] = why
    return [k for k in kept if k.sample_id not in report.review]


def _hold_outlier_labellers(
    items: list[FieldLabel], rules: ScreenRules, report: ScreenReport
) -> list[FieldLabel]:
    confident = [i for i in items if i.predicted is not None and (i.confidence or 0.0) >= rules.confident]
    per: dict[str, list[bool]] = defaultdict(list)
    for i in confident:
        per[i.labeller].append(i.label != i.predicted)
    report.disagreement = {who: sum(d) / len(d) for who, d in per.items()}
    outliers = set()
    for who, disagree in per.items():
        others = [d for other, ds in per.items() if other != who for d in ds]
        if len(disagree) < rules.min_confident or not others:
            continue
        if sum(disagree) / len(disagree) - sum(others) / len(others) > rules.outlier_margin:
            outliers.add(who)
    for i in items:
        if i.labeller in outliers:
            rate = report.disagreement[i.labeller]
            report.review[i.sample_id] = (
                f"labeller_outlier: {i.labeller} disagrees with confident predictions on {rate:.0%}"
            )
    return [i for i in items if i.labeller not in outliers]


def _cap(
    items: list[FieldLabel],
    key: Callable[[FieldLabel], str],
    share: float,
    base_size: int,
    reason: str,
    report: ScreenReport,
) -> list[FieldLabel]:
    """Keep each key's oldest samples up to ``share`` of the training set (base data + field)."""
    total = base_size + len(items)
    limit = int(share * total)
    seen: Counter[str] = Counter()
    kept = []
    for i in items:
        k = key(i)
        if seen[k] < limit:
            seen[k] += 1
            kept.append(i)
        else:
            report.dropped[i.sample_id] = f"{reason}: {k} has {limit} ({share:.0%} of {total})"
    return kept
