"""The release gate names the rule that failed and skips what it cannot judge."""

from __future__ import annotations

import pytest

from edge_agent.package_evaluation import ReportScores
from trainer.evaluation.gate import GateCandidate, GateRules, check_gate


def _eval(
    acc: float,
    ece: float = 0.02,
    images: int = 400,
    night: float = 0.8,
    day: float = 0.95,
    held: dict | None = None,
) -> GateCandidate:
    return GateCandidate.model_validate(
        {
            "device": {
                "accuracy": acc,
                "ece": ece,
                "images": images,
                "slices": {
                    "lighting": {
                        "night": {"accuracy": night, "images": 60},
                        "day": {"accuracy": day, "images": 300},
                        "dusk": {"accuracy": 0.5, "images": 5},
                    }
                },
            },
            "heldout_accuracy": held or {"torch-fp32": acc, "onnx-int8": acc, "tflite-int8": acc},
            "int8": ["onnx-int8", "tflite-int8"],
        }
    )


def _champ(acc: float, **kw: float) -> ReportScores:
    """The champion's device report on the same test images."""
    return _eval(acc, **kw).device  # type: ignore[arg-type]


def test_a_good_candidate_passes_every_rule() -> None:
    report = check_gate(_eval(0.92), _champ(0.91), GateRules())
    assert report.passed, report.failures()
    names = {r.rule for r in report.results}
    assert {
        "max_ece",
        "max_int8_drop[onnx-int8]",
        "max_accuracy_drop",
        "max_slice_drop[lighting=night]",
    } <= names
    # the 5-image slice is not judged, and the report says so
    dusk = next(r for r in report.results if r.rule == "max_slice_drop[lighting=dusk]")
    assert dusk.passed and "not judged" in dusk.detail


def test_each_rule_fails_on_its_own_and_says_why() -> None:
    rules = GateRules(max_slice_drop=2.0, max_int8_drop=1.0, max_ece=0.03, min_accuracy=0.9)
    slice_drop = check_gate(_eval(0.92, night=0.77), _champ(0.92, night=0.80), rules)
    assert slice_drop.failures() == [
        "max_slice_drop[lighting=night]: 77.0% vs champion 80.0% (-3.0 points, limit -2.0)"
    ]
    int8 = check_gate(
        _eval(0.92, held={"torch-fp32": 0.92, "onnx-int8": 0.905, "tflite-int8": 0.915}), None, rules
    )
    assert [f.split(":")[0] for f in int8.failures()] == ["max_int8_drop[onnx-int8]"]
    assert "-1.5 points" in int8.failures()[0]
    cal = check_gate(_eval(0.92, ece=0.045), None, rules)
    assert cal.failures() == ["max_ece: ECE 4.5% (limit 3.0%, 400 test images)"]
    low = check_gate(_eval(0.85), None, rules)
    assert [f.split(":")[0] for f in low.failures()] == ["min_accuracy"]
    worse = check_gate(_eval(0.90), _champ(0.93), rules)
    assert "max_accuracy_drop" in [f.split(":")[0] for f in worse.failures()]


def test_small_test_sets_do_not_judge_ece_and_required_gains_are_enforced() -> None:
    small = check_gate(_eval(0.9, ece=0.2, images=40), None, GateRules(max_ece=0.03))
    assert small.passed and "not judged" in small.results[0].detail
    rules = GateRules(min_slice_gain={"lighting=night": 5.0, "lighting=fog": 1.0})
    report = check_gate(_eval(0.92, night=0.83), _champ(0.92, night=0.80), rules)
    fails = report.failures()
    assert any(
        f.startswith("min_slice_gain[lighting=night]") and "+3.0 points, need +5.0" in f for f in fails
    )
    assert any(f.startswith("min_slice_gain[lighting=fog]") and "not present" in f for f in fails)
    assert check_gate(
        _eval(0.92, night=0.90), _champ(0.92, night=0.80), GateRules(min_slice_gain={"lighting=night": 5.0})
    ).passed


def test_paired_drops_fail_only_when_significant() -> None:
    from scipy.stats import binomtest

    from trainer.evaluation.gate import mcnemar_worse_p

    for lost, gained in ((3, 1), (10, 2), (7, 0), (5, 5), (0, 4)):
        want = binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue if lost > gained else 1.0
        assert mcnemar_worse_p(lost, gained) == pytest.approx(want)
    held = {
        "torch-fp32": 0.806,
        "onnx-int8": 0.778,
        "tflite-int8": 0.806,
    }  # 72 images: -2 images on onnx-int8
    noisy = check_gate(
        _eval(0.8, held=held), None, GateRules(), {"int8[onnx-int8]": (3, 1), "int8[tflite-int8]": (1, 1)}
    )
    assert noisy.passed, noisy.failures()
    assert "within noise" in next(r.detail for r in noisy.results if r.rule == "max_int8_drop[onnx-int8]")
    broken = check_gate(
        _eval(0.8, held={**held, "onnx-int8": 0.55}), None, GateRules(), {"int8[onnx-int8]": (19, 1)}
    )
    assert [f.split(":")[0] for f in broken.failures()] == [
        "max_int8_drop[onnx-int8]"
    ] and "significant" in broken.failures()[0]
    raw = check_gate(_eval(0.8, held=held), None, GateRules(significance=None), {"int8[onnx-int8]": (3, 1)})
    assert [f.split(":")[0] for f in raw.failures()] == ["max_int8_drop[onnx-int8]"]
    # a slice regression against the champion is judged on that slice's paired images
    slice_pairs = {"slice[lighting=night]": (12, 1), "overall": (12, 10)}
    rep = check_gate(_eval(0.92, night=0.62), _champ(0.92, night=0.80), GateRules(), slice_pairs)
    assert [f.split(":")[0] for f in rep.failures()] == ["max_slice_drop[lighting=night]"]
