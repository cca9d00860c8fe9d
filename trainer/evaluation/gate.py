"""The release gate: configurable rules a candidate must pass, alone and against the champion.

Pure logic on typed test reports (:mod:`edge_agent.package_evaluation`, as written into model.json).
Each rule yields a :class:`RuleResult` saying what was measured and the limit, so a failure names the
rule that failed::

    decision = check_gate(GateCandidate(device=report, heldout_accuracy=held, int8=["onnx-int8"]),
                          champion_report, GateRules(max_slice_drop=2.0, max_int8_drop=1.0, max_ece=0.03))
    if not decision.passed:
        print(decision.failures())   # ["max_slice_drop[lighting=night]: 81.2% vs champion 85.0% ..."]

Accuracy differences are in percentage points. They are paired comparisons (int8 and fp32, candidate
and champion, on the same images), so a drop rule fails when the observed loss exceeds its limit *and*
the loss is statistically significant on the images where the two disagree (exact one-sided McNemar
test at ``significance``; ``None`` judges the raw difference alone). On 70 test images one flipped
image is 1.4 points: without the test, a 1-point rule would fail on noise, and a coarser rule would let
real regressions through on large test sets. Slices with fewer than ``min_slice_images`` test images are
not judged, and said so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.package_evaluation import GateRecord, ReportScores, RuleResult, SliceScore


class GateRules(BaseModel):
    """Rules of the gate; ``None`` switches a rule off."""

    model_config = ConfigDict(extra="forbid")
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    """Test accuracy of the device artifact must reach this."""
    max_ece: float | None = Field(default=0.05, ge=0)
    """ECE (15 bins, after temperature scaling) of the device artifact on the test split. ECE has a noise
    floor: a perfectly calibrated 94%-accurate model shows a mean (95th percentile) ECE of 4.6% (7.2%) on
    100 images, 2.9% (4.3%) on 300 and 1.5% (2.4%) on 1,000 (simulated). Do not set it tighter than that."""
    min_ece_images: int = Field(default=300, ge=1)
    """Below this many test images the ECE rule is not judged (the estimate is mostly noise), and says so."""
    max_int8_drop: float | None = Field(default=1.0, ge=0)
    """Every int8 artifact's held-out accuracy within this many points of torch fp32."""
    max_accuracy_drop: float | None = Field(default=1.0, ge=0)
    """Points the candidate may lose against the champion overall (same test images, device artifacts)."""
    max_slice_drop: float | None = Field(default=2.0, ge=0)
    """Points the candidate may lose against the champion on any slice (key=value)."""
    min_slice_gain: dict[str, float] = Field(default_factory=dict)
    """Slices (``"lighting=night"``) on which the candidate must beat the champion by at least these points."""
    min_slice_images: int = Field(default=20, ge=1)
    significance: float | None = Field(default=0.05, gt=0, lt=1)
    """A drop beyond a limit fails only if McNemar's exact test on the discordant images rejects "not worse"
    at this level; ``None`` fails on the observed difference alone."""


class GateCandidate(BaseModel):
    """What the gate judges of a candidate: its device artifact's test report, every model's held-out
    accuracy (``torch-fp32`` and each artifact) and which artifacts are int8."""

    device: ReportScores
    heldout_accuracy: dict[str, float]
    int8: list[str] = Field(default_factory=list)


class GateDecision(BaseModel):
    """Every rule's verdict, in the order judged; the candidate passes when all passed."""

    results: list[RuleResult] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[str]:
        return [f"{r.rule}: {r.detail}" for r in self.results if not r.passed]

    def add(self, rule: str, passed: bool, detail: str) -> None:
        self.results.append(RuleResult(rule=rule, passed=passed, detail=detail))

    def record(self, rules: GateRules, discordant: Mapping[str, tuple[int, int]]) -> GateRecord:
        """The decision as model.json keeps it, with the rules and paired counts it was made on."""
        return GateRecord(
            passed=self.passed,
            rules=self.results,
            rules_config=rules.model_dump(),
            discordant=dict(discordant),
        )


def _pts(x: float) -> str:
    return f"{100 * x:.1f}%"


def mcnemar_worse_p(worse: int, better: int) -> float:
    """One-sided exact McNemar p-value that a model is *not* worse than its reference, given the images only
    the reference gets right (``worse``) and only the model gets right (``better``)."""
    n = worse + better
    if n == 0 or worse <= better:
        return 1.0
    return sum(math.comb(n, i) for i in range(worse, n + 1)) / 2.0**n


def _drop_rule(
    report: GateDecision,
    rule: str,
    drop: float,
    limit: float,
    pair: tuple[int, int] | None,
    alpha: float | None,
    text: str,
) -> None:
    """Fail when ``drop`` (points) exceeds ``limit`` and, with discordant counts, is significant."""
    if drop <= limit:
        report.add(rule, True, text)
        return
    if alpha is None or pair is None:
        report.add(rule, False, text)
        return
    p = mcnemar_worse_p(*pair)
    report.add(
        rule,
        p >= alpha,
        f"{text}; {pair[0]} images lost, {pair[1]} gained: McNemar p={p:.3g} "
        f"({'within noise' if p >= alpha else 'significant'} at {alpha})",
    )


def check_gate(
    candidate: GateCandidate,
    champion: ReportScores | None,
    rules: GateRules,
    discordant: Mapping[str, tuple[int, int]] | None = None,
) -> GateDecision:
    """Judge ``candidate`` alone and, when given, against ``champion`` (the champion's device artifact on
    the same test images) with ``rules``. ``discordant`` holds the paired counts (images lost, images
    gained) under ``int8[KEY]``, ``overall`` and ``slice[KEY=VALUE]``.
    """
    decision = GateDecision()
    pairs = discordant or {}
    _candidate_rules(decision, candidate, rules, pairs)
    if champion is not None:
        _champion_rules(decision, candidate.device, champion, rules, pairs)
    return decision


def _candidate_rules(
    decision: GateDecision, candidate: GateCandidate, rules: GateRules, pairs: Mapping[str, tuple[int, int]]
) -> None:
    """The rules on the candidate alone: accuracy, calibration, and int8 against torch fp32."""
    dev = candidate.device
    if rules.min_accuracy is not None:
        acc = dev.accuracy
        decision.add(
            "min_accuracy", acc >= rules.min_accuracy, f"{_pts(acc)} (limit {_pts(rules.min_accuracy)})"
        )
    if rules.max_ece is not None:
        e, n = dev.ece, dev.images
        if n < rules.min_ece_images:
            decision.add(
                "max_ece", True, f"not judged: ECE {_pts(e)} on {n} test images < {rules.min_ece_images}"
            )
        else:
            decision.add(
                "max_ece", e <= rules.max_ece, f"ECE {_pts(e)} (limit {_pts(rules.max_ece)}, {n} test images)"
            )
    if rules.max_int8_drop is None:
        return
    held = candidate.heldout_accuracy
    fp32 = held["torch-fp32"]
    for key in candidate.int8:
        drop = 100 * (fp32 - held[key])
        _drop_rule(
            decision,
            f"max_int8_drop[{key}]",
            drop,
            rules.max_int8_drop,
            pairs.get(f"int8[{key}]"),
            rules.significance,
            f"{_pts(held[key])} vs torch fp32 {_pts(fp32)} ({-drop:+.1f} points, limit -{rules.max_int8_drop:.1f})",
        )


def _champion_rules(
    decision: GateDecision,
    dev: ReportScores,
    champ: ReportScores,
    rules: GateRules,
    pairs: Mapping[str, tuple[int, int]],
) -> None:
    """The rules against the champion on the same test images: overall, then slice by slice."""
    if rules.max_accuracy_drop is not None:
        d = 100 * (dev.accuracy - champ.accuracy)
        _drop_rule(
            decision,
            "max_accuracy_drop",
            -d,
            rules.max_accuracy_drop,
            pairs.get("overall"),
            rules.significance,
            f"{_pts(dev.accuracy)} vs champion {_pts(champ.accuracy)} ({d:+.1f} points, limit -{rules.max_accuracy_drop:.1f})",
        )
    for key, values in dev.slices.items():
        for value, s in values.items():
            other = champ.slices.get(key, {}).get(value)
            if other is not None:
                _slice_rules(decision, f"{key}={value}", s, other, rules, pairs)
    for name in rules.min_slice_gain:
        key, _, value = name.partition("=")
        if value not in dev.slices.get(key, {}) or value not in champ.slices.get(key, {}):
            decision.add(f"min_slice_gain[{name}]", False, "slice not present in the test data")


def _slice_rules(
    decision: GateDecision,
    name: str,
    s: SliceScore,
    other: SliceScore,
    rules: GateRules,
    pairs: Mapping[str, tuple[int, int]],
) -> None:
    """One slice (``lighting=night``) against the champion: a required gain, and the drop limit."""
    d = 100 * (s.accuracy - other.accuracy)
    vs = f"{_pts(s.accuracy)} vs champion {_pts(other.accuracy)}"
    gain = rules.min_slice_gain.get(name)
    if gain is not None:
        decision.add(
            f"min_slice_gain[{name}]",
            d >= gain,
            f"{vs} ({d:+.1f} points, need +{gain:.1f}; {s.images} images)",
        )
    if rules.max_slice_drop is None:
        return
    if s.images < rules.min_slice_images:
        decision.add(
            f"max_slice_drop[{name}]", True, f"not judged: {s.images} images < {rules.min_slice_images}"
        )
        return
    _drop_rule(
        decision,
        f"max_slice_drop[{name}]",
        -d,
        rules.max_slice_drop,
        pairs.get(f"slice[{name}]"),
        rules.significance,
        f"{vs} ({d:+.1f} points, limit -{rules.max_slice_drop:.1f})",
    )
