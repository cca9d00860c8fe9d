"""export_package on a tiny model: all four artifacts, the before_commit hook, and atomic failure."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.package import PreprocessSpec, load_package
from edge_agent.selftest import self_test
from trainer.export.package import ExportError, ExportSpec, export_package


class ColourNet(torch.nn.Module):
    """Predicts the dominant colour channel: tiny, deterministic and quantization friendly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            for c in range(3):
                self.conv.weight[c, c, 1, 1] = 1.0
            self.head.weight.zero_()
            self.head.bias.zero_()
            for c in range(3):
                self.head.weight[c, c] = 8.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.relu6(self.conv(x) + 1).mean(dim=(2, 3)))


def _frames(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 60, (96, 128, 3), dtype=np.uint8)
        img[..., i % 3] += 150  # BGR frame; dominant channel cycles
        out.append(img)
    return out


SPEC = PreprocessSpec(size=(32, 32), color="RGB", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


def _spec(**kw) -> ExportSpec:
    kw.setdefault("version", "0.1.0")
    return ExportSpec(name="colour", labels=["red", "green", "blue"], preprocess=SPEC, **kw)


def _evaluation(**drop: object) -> dict:
    """A minimal evaluation block: one device artifact's report and a passed gate (keys in ``drop`` left out)."""
    report = {
        "images": 16,
        "accuracy": 1.0,
        "macro_f1": 1.0,
        "ece": 0.01,
        "nll": 0.05,
        "mean_confidence": 0.97,
        "per_class": {c: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 4} for c in "rgbw"},
        "confusion": [[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0], [0, 0, 0, 4]],
        "slices": {},
    }
    ev = {
        "device_artifact": "onnx-int8",
        "models": {"onnx-int8": report},
        "heldout_accuracy": {"torch-fp32": 1.0, "onnx-int8": 1.0},
        "gate": {"passed": True, "rules": [{"rule": "max_ece", "passed": True, "detail": "ECE 1.0%"}]},
    }
    return {k: v for k, v in ev.items() if k not in drop}


def test_an_evaluation_without_the_gate_or_the_device_report_is_refused(tmp_path: Path) -> None:
    """model.json's evaluation block is validated: a package cannot claim an evaluation it did not make."""
    no_gate = _evaluation(gate=True)
    no_device = {**_evaluation(), "device_artifact": "tflite-int8"}
    for bad, why in ((no_gate, "gate"), (no_device, "no test report for the device artifact")):
        with pytest.raises(ValueError, match=why):
            export_package(
                ColourNet(),
                _spec(),
                _frames(16, 0),
                tmp_path / "bad",
                before_commit=lambda draft, b=bad: {"evaluation": b},
                progress=False,
            )
        assert not (tmp_path / "bad").exists()


def test_export_writes_a_verified_package_with_hook_fields(tmp_path: Path, capsys) -> None:
    seen = {}

    def hook(draft):  # receives a loadable draft package
        seen["artifacts"] = sorted(draft.manifest.artifacts)
        return {"temperature": 1.5, "evaluation": _evaluation()}

    out = tmp_path / "colour"
    report = export_package(ColourNet(), _spec(), _frames(16, 0), out, before_commit=hook)
    pkg = load_package(out)
    numbers = re.findall(r"\[export (\d+)/(\d+)\] .* done in", capsys.readouterr().err)
    assert [int(n) for n, _ in numbers] == list(range(1, len(numbers) + 1)), numbers
    assert {int(total) for _, total in numbers} == {len(numbers)}, "the progress total is the steps taken"
    assert seen["artifacts"] == ["onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"]
    assert pkg.manifest.temperature == 1.5 and pkg.manifest.evaluation is not None
    assert pkg.manifest.evaluation.device_report().accuracy == 1.0 and pkg.manifest.evaluation.gate.passed
    assert all(v == 1.0 for v in report.agreement.values()), report.agreement
    for key in pkg.manifest.artifacts:
        assert self_test(pkg, key).passed
    # labels of golden inputs: BGR frame with dominant channel 2 is red in RGB
    assert {g.expected_label for g in pkg.manifest.golden} <= {"red", "green", "blue"}
    assert not list(tmp_path.glob(".colour.*")), "temporary directories left behind"


def test_failed_export_leaves_nothing_and_keeps_the_old_package(tmp_path: Path) -> None:
    out = tmp_path / "colour"

    def boom(draft):
        raise RuntimeError("gate failed")

    with pytest.raises(RuntimeError, match="gate failed"):
        export_package(
            ColourNet(), _spec(formats=("onnx-fp32",)), _frames(8, 0), out, before_commit=boom, progress=False
        )
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    export_package(ColourNet(), _spec(formats=("onnx-fp32",)), _frames(8, 0), out, progress=False)
    before = load_package(out).sha256
    with pytest.raises(RuntimeError):
        export_package(
            ColourNet(),
            _spec(formats=("onnx-fp32",), version="0.2.0"),
            _frames(8, 0),
            out,
            before_commit=boom,
            overwrite=True,
            progress=False,
        )
    assert load_package(out).sha256 == before  # the old package is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colour"]


def test_export_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown or no formats"):
        export_package(
            ColourNet(), _spec(formats=("onnx-fp16",)), _frames(8, 0), tmp_path / "x", progress=False
        )
    with pytest.raises(ExportError, match="at least 8 calibration frames"):
        export_package(ColourNet(), _spec(), _frames(3, 0), tmp_path / "x", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_package(ColourNet(), _spec(), _frames(8, 0), tmp_path / "exists", progress=False)


def test_int8_calibration_and_the_choice_are_recorded(tmp_path: Path) -> None:
    """ONNX ranges come from augmented views of the calibration frames, TFLite's from the frames; the
    agreement is measured on the check frames passed; model.json says which variant was kept and why."""
    out = tmp_path / "colour"
    export_package(
        ColourNet(),
        _spec(calibration_views=40),
        _frames(16, 0),
        out,
        check_frames=_frames(12, 1),
        progress=False,
    )
    arts = load_package(out).manifest.artifacts
    onnx_q, tflite_q = arts["onnx-int8"].quantization, arts["tflite-int8"].quantization
    assert onnx_q is not None and tflite_q is not None
    assert onnx_q["calibration_images"] == 40 and tflite_q["calibration_images"] == 16
    for q in (onnx_q, tflite_q):
        assert q["check_frames"] == 12
        # the colour net is exact in int8: the first variant (all int8) reaches the target and is kept
        assert q["float_prefix"] == "first 0% of the convolutions kept in float", q
        assert q["chosen_because"].startswith("fewest float layers reaching 97%"), q
        assert list(q["variants"]) == ["0% float"]
