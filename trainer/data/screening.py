"""Poisoning defences for field labels: what may enter a training set from the fleet, and why not.

Labelled field samples come from devices (one may be compromised, or just stuck on one scene) and from
labellers (one may be careless or hostile). Before a retraining run uses them, :func:`screen_field`
applies, in order:

1. near-duplicates: a sample whose perceptual hash is within ``duplicate_bits`` of an earlier kept one
   is dropped; if the two carry different labels both are held for review (a relabelled copy is the
   cheapest poison there is);
2. labeller outliers: on samples the serving model classified confidently (top-1 probability at least
   ``confident``), a labeller (with at least ``min_confident`` such samples) who disagrees with it
   ``outlier_margin`` more often than expected has every label held for review. Expected is the other
   labellers' disagreement on their confident samples when they have at least ``min_confident`` (they
   see the same drift, so a model that is confidently wrong on new data does not single anyone out);
   for a sole labeller it is the champion's own expected error on those samples, the mean of
   ``1 - confidence``;
3. caps: after capping, no device's and no labeller's field samples exceed ``max_device_share`` /
   ``max_labeller_share`` of the set that is trained on (the ``base_size`` original images plus the
   field samples kept). A source keeping ``k`` of them next to ``others`` images must satisfy
   ``k <= share * (k + others)``, i.e. ``k <= share / (1 - share) * others``; dropping one source's
   samples shrinks the others' allowance, so the caps are applied again until none is exceeded, and
   then a dropped sample that fits again (its device and its labeller within their shares with it) is
   re-admitted: every sample a cap drops would break a cap if it were added back. Which samples stay
   is a seeded draw (``seed``): a hash of the seed and the sample id ranks each source's samples, so
   the kept ones spread over the whole labelling period (not its first burst), do not depend on the
   order the records arrive in, and a flooding device cannot choose which of its samples survive.
   With ``base_size`` None the field samples are the whole set: a single device then keeps nothing
   unless ``max_device_share`` is 1.

Pure logic: records in, a :class:`ScreenReport` out (kept sample ids, each dropped or held sample with
its reason, per-labeller disagreement rates).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

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
    seed: int = 0
    """Which of a capped source's samples stay (a hash of seed and sample id ranks them)."""


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
    expected_disagreement: dict[str, float] = field(default_factory=dict)
    """Per labeller judged: what it was compared with (the other labellers', or the champion's expected error)."""

    def summary(self) -> dict[str, object]:
        return {
            "kept": len(self.kept),
            "dropped": dict(Counter(r.split(":")[0] for r in self.dropped.values())),
            "review": dict(Counter(r.split(":")[0] for r in self.review.values())),
            "labeller_disagreement": {k: round(v, 3) for k, v in sorted(self.disagreement.items())},
            "labeller_expected": {k: round(v, 3) for k, v in sorted(self.expected_disagreement.items())},
        }


def screen_field(items: Sequence[FieldLabel], base_size: int | None, rules: ScreenRules) -> ScreenReport:
    """Apply the near-duplicate, labeller-outlier and share checks (see the module docstring); the
    share caps hold on the set trained on: ``base_size`` original images (None: none, the field samples
    are the whole set) plus the field samples kept."""
    if base_size is not None and base_size < 0:
        raise ValueError(f"screen_field: base_size must be >= 0, got {base_size}")
    report = ScreenReport()
    ordered = sorted(items, key=lambda i: (i.labelled_at, i.sample_id))
    survivors = _drop_near_duplicates(ordered, rules.duplicate_bits, report)
    survivors = _hold_outlier_labellers(survivors, rules, report)
    survivors = _cap_shares(survivors, base_size or 0, rules, report)
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
    """Hold every label of a labeller who contradicts confident predictions more than expected."""
    confident = [i for i in items if i.predicted is not None and (i.confidence or 0.0) >= rules.confident]
    per: dict[str, list[FieldLabel]] = defaultdict(list)
    for i in confident:
        per[i.labeller].append(i)
    report.disagreement = {who: _disagreement(mine) for who, mine in per.items()}
    outliers = set()
    for who, mine in per.items():
        if len(mine) < rules.min_confident:
            continue
        peers = [i for other, theirs in per.items() if other != who for i in theirs]
        expected = _expected_disagreement(mine, peers, rules.min_confident)
        report.expected_disagreement[who] = expected
        if report.disagreement[who] - expected > rules.outlier_margin:
            outliers.add(who)
    for i in items:
        if i.labeller in outliers:
            rate, expected = report.disagreement[i.labeller], report.expected_disagreement[i.labeller]
            report.review[i.sample_id] = (
                f"labeller_outlier: {i.labeller} disagrees with confident predictions on {rate:.0%} "
                f"(expected {expected:.0%})"
            )
    return [i for i in items if i.labeller not in outliers]


def _disagreement(items: Sequence[FieldLabel]) -> float:
    """Share of ``items`` labelled otherwise than the serving model predicted."""
    return sum(i.label != i.predicted for i in items) / len(items)


def _expected_disagreement(mine: list[FieldLabel], peers: list[FieldLabel], min_confident: int) -> float:
    """What an honest labeller's disagreement would be: the other labellers' on their confident samples
    when there are enough of them, else the champion's own expected error (mean of 1 - confidence): a
    sole labeller is compared with the model, not waved through."""
    if len(peers) >= min_confident:
        return _disagreement(peers)
    return sum(1.0 - (i.confidence or 0.0) for i in mine) / len(mine)


_Cap = tuple[str, Callable[[FieldLabel], str], float]
"""A share cap: its reason, the source a sample counts for (device or labeller), the share."""


def _cap_shares(
    items: list[FieldLabel], base_size: int, rules: ScreenRules, report: ScreenReport
) -> list[FieldLabel]:
    """Drop field samples until no device and no labeller exceeds its share of the final training set
    (``base_size`` + the samples kept): dropping some shrinks the others' allowance, hence the loop;
    then re-admit what fits again (a device capped first may have lost samples to the labeller cap)."""
    caps: list[_Cap] = [
        ("device_cap", lambda i: i.device, rules.max_device_share),
        ("labeller_cap", lambda i: i.labeller, rules.max_labeller_share),
    ]
    rank = {i.sample_id: _rank(rules.seed, i.sample_id) for i in items}
    kept, dropped = list(items), dict[int, str]()
    while True:
        before = len(kept)
        for reason, key, share in caps:
            kept, gone = _cap_pass(kept, key, share, base_size, rank)
            dropped.update(dict.fromkeys(gone, reason))
        if len(kept) == before:
            break
    back = _readmit(kept, [i for i in items if i.sample_id in dropped], caps, base_size, rank)
    stays = {i.sample_id for i in kept} | back
    kept = [i for i in items if i.sample_id in stays]
    total = base_size + len(kept)
    for reason, key, share in caps:
        had, has = Counter(key(i) for i in items), Counter(key(i) for i in kept)
        for i in items:
            if i.sample_id not in stays and dropped.get(i.sample_id) == reason:
                report.dropped[i.sample_id] = (
                    f"{reason}: {key(i)} keeps {has[key(i)]} of {had[key(i)]} "
                    f"(at most {share:.0%} of the {total} images trained on)"
                )
    return kept


def _readmit(
    kept: list[FieldLabel], dropped: list[FieldLabel], caps: list[_Cap], base_size: int, rank: dict[int, int]
) -> set[int]:
    """Ids of dropped samples that fit again, best-ranked first: a sample fits when its own device and
    labeller stay within their shares with it (adding it only widens every other source's allowance)."""
    counts = [Counter(key(i) for i in kept) for _, key, _ in caps]
    total, back = base_size + len(kept), set[int]()
    waiting = sorted(dropped, key=lambda i: rank[i.sample_id])
    while True:
        before = len(back)
        for i in waiting:
            if i.sample_id not in back and all(
                share >= 1 or counts[n][key(i)] + 1 <= Fraction(share) * (total + 1)
                for n, (_, key, share) in enumerate(caps)
            ):
                back.add(i.sample_id)
                total += 1
                for n, (_, key, _) in enumerate(caps):
                    counts[n][key(i)] += 1
        if len(back) == before:
            return back


def _cap_pass(
    items: list[FieldLabel],
    key: Callable[[FieldLabel], str],
    share: float,
    base_size: int,
    rank: dict[int, int],
) -> tuple[list[FieldLabel], set[int]]:
    """One pass over the sources of ``key``: each keeps its best-ranked samples up to
    ``share / (1 - share)`` times the images beside it (base data and the other sources' samples);
    returns what stays and the ids dropped."""
    if share >= 1:
        return items, set()
    counts = Counter(key(i) for i in items)
    total = base_size + len(items)
    ratio = Fraction(share) / (1 - Fraction(share))  # exact: k <= share * (k + others)
    drop: set[int] = set()
    for source, k in counts.items():
        limit = math.floor(ratio * (total - k))
        if k > limit:
            theirs = sorted((i for i in items if key(i) == source), key=lambda i: rank[i.sample_id])
            drop.update(i.sample_id for i in theirs[limit:])
    return [i for i in items if i.sample_id not in drop], drop


def _rank(seed: int, sample_id: int) -> int:
    """A sample's place in the seeded draw of what a capped source keeps (lowest first)."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
