"""Real training on the built-in dataset: accuracy, the package contents, the drift reference against the
agent's own telemetry path, the gate, bad input, reproducibility and the CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.backends import BackendOptions
from edge_agent.cli import main as edgefleet
from edge_agent.package import load_package
from edge_agent.pipeline import LoadedModel, Pipeline
from edge_agent.sources.base import EndOfStream
from edge_agent.sources.memory import MemorySource
from edge_agent.telemetry.aggregator import FrameResult, TelemetryAggregator
from edge_agent.telemetry.features import output_features
from trainer.build import train_package
from trainer.data import builtin_dataset, load_dataset
from trainer.errors import DataError, GateError, LabelMismatchError
from trainer.evaluation.gate import GateRules
from trainer.model.backbone import build_classifier, split
from trainer.model.fit import FitConfig, fit_suffix


def test_training_learns_well_above_chance_for_torch_and_every_artifact(shapes_package) -> None:
    ev = shapes_package.evaluation.model_dump(mode="json")
    chance = 1 / 8
    assert set(ev["models"]) == {"torch-fp32", "onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"}
    for key, r in ev["models"].items():
        assert r["accuracy"] >= 0.6 > 4 * chance, (key, r["accuracy"])
        assert ev["heldout_accuracy"][key] >= 0.6, key
    # fp32 exports compute what torch computes; int8's cost is measured, not assumed
    assert ev["models"]["onnx-fp32"]["agreement_with_torch"] >= 0.97
    assert set(ev["int8_minus_fp32_points"]) == {"onnx-int8", "tflite-int8"}
    tr = ev["training"]
    assert tr["history"][0]["val_nll"] > tr["best_val_nll"] and tr["epochs_run"] >= tr["best_epoch"] >= 1
    cal = ev["calibration"]
    assert cal["temperature"] == pytest.approx(shapes_package.package.manifest.temperature)
    assert cal["val"]["nll_after"] <= cal["val"]["nll_before"] + 1e-9  # fitted by NLL on validation
    rob = ev["robustness"]
    assert set(rob["models"]) == set(ev["models"]) and rob["severities"] == [1, 5]
    for m in rob["models"].values():  # severity 5 hurts more than severity 1 on average
        assert np.mean([a[1] for a in m["accuracy"].values()]) < np.mean(
            [a[0] for a in m["accuracy"].values()]
        )
    assert {"lighting", "background", "domain"} <= set(ev["models"]["tflite-int8"]["slices"])


def test_package_is_complete_verified_and_self_tests(shapes_package, shapes_uri, capsys) -> None:
    pkg = load_package(shapes_package.package.root)  # verifies every hash, including the card
    m = pkg.manifest
    assert m.labels == list(builtin_dataset(shapes_uri.replace("n=30", "n=1")).labels)
    for name in ("card.html", "data_manifest.json"):
        assert name in m.files
    card = (pkg.root / "card.html").read_text()
    assert (
        len(re.findall(r'src="data:image/png;base64,', card)) == 4
    )  # confusion, reliability, heatmap, slices
    assert not re.search(r'src="(?!data:)', card), "the card must be self-contained"
    manifest = json.loads((pkg.root / "data_manifest.json").read_text())
    assert len(manifest["entries"]) == 240 and all(len(e["sha256"]) == 64 for e in manifest["entries"])
    assert m.reference is not None and m.reference.artifact == "tflite-int8"
    assert m.evaluation is not None and m.evaluation.gate.passed is True
    assert m.evaluation.device_report().accuracy == m.evaluation.models["tflite-int8"].accuracy
    assert edgefleet(["agent", "selftest", "--package", str(pkg.root)]) == 0
    assert capsys.readouterr().out.count("PASS") == 4


def _agent_window(pkg, artifact: str, frames: list[np.ndarray]):  # type: ignore[no-untyped-def]
    """What a device running ``artifact`` reports for ``frames``: the agent's own pipeline and aggregator."""
    model = LoadedModel.load(pkg, artifact, BackendOptions(threads=1))
    agg = TelemetryAggregator(
        fleet="f",
        device="d",
        session=1,
        model=model.ref,
        agent_version="t",
        edges=pkg.manifest.telemetry_edges,
        now=0.0,
        window_seconds=None,
        window_frames=10_000,
        atc_threshold=pkg.manifest.reference.atc_threshold,
    )
    pipe = Pipeline(MemorySource(frames).start(), model).start()
    try:
        while True:
            try:
                results = pipe.results(timeout=1.0)
            except EndOfStream:
                break
            for r in results:
                (features,) = output_features(r.probs)
                agg.add(FrameResult(output=features, inputs=r.inputs, latency_ms=r.latency_ms))
    finally:
        pipe.stop()
        model.close()
    return agg.close(1.0)


def test_reference_histograms_equal_what_the_agent_reports_on_the_same_images(
    shapes_package, shapes_dataset
) -> None:
    pkg = load_package(shapes_package.package.root)
    ref = pkg.manifest.reference
    held = shapes_dataset.split("val") + shapes_dataset.split("test")
    window = _agent_window(pkg, ref.artifact, [s.frame() for s in held])
    assert window.frames.inferred == ref.images == len(held)
    assert set(ref.histograms) == set(pkg.manifest.telemetry_edges)
    for name, hist in ref.histograms.items():
        assert hist.edges == pkg.manifest.telemetry_edges[name]
        assert window.histograms[name] == hist, name
    prior = [window.class_counts.get(i, 0) / window.frames.inferred for i in range(len(pkg.manifest.labels))]
    assert prior == pytest.approx(ref.class_prior)
    assert window.confidence_mean == pytest.approx(ref.mean_confidence)
    # ATC on the reference data: the share above the threshold is the reference accuracy (within one image)
    assert abs(window.atc_above / window.frames.inferred - ref.accuracy) <= 1 / ref.images + 1e-9
    assert ref.accuracy == pytest.approx(shapes_package.evaluation.heldout_accuracy[ref.artifact])


def test_eval_command_reproduces_the_training_evaluation(
    shapes_package, shapes_uri, tmp_path, capsys
) -> None:
    out = tmp_path / "eval.json"
    root = str(shapes_package.package.root)
    assert (
        edgefleet(
            [
                "eval",
                "--package",
                root,
                "--data",
                shapes_uri,
                "--corruptions",
                "fog",
                "--robustness-images",
                "8",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    ev = json.loads(out.read_text())
    trained = shapes_package.evaluation.model_dump(mode="json")["models"]
    assert set(ev["models"]) == set(trained) - {"torch-fp32"}
    for key, r in ev["models"].items():
        assert r["accuracy"] == pytest.approx(trained[key]["accuracy"]), key
        assert r["confusion"] == trained[key]["confusion"], key
    assert set(ev["robustness"]["models"]) == set(ev["models"]) and ev["robustness"]["corruptions"] == ["fog"]
    assert "tflite-int8" in capsys.readouterr().out


def test_gate_failure_leaves_no_package_and_names_the_rule(
    shapes_package, shapes_dataset, feature_cache, small_train_config, tmp_path
) -> None:
    out = tmp_path / "candidate"
    cfg = small_train_config(
        feature_cache=str(feature_cache),
        formats=["onnx-fp32", "onnx-int8"],
        robustness={"enabled": False},
        gate=GateRules(min_slice_gain={"lighting=dusk": 50.0}),
    )
    with pytest.raises(GateError) as info:
        train_package(shapes_dataset, out, cfg, champion=shapes_package.package.root)
    assert info.value.failures and info.value.failures[0].startswith("min_slice_gain[lighting=dusk]")
    ev = info.value.evaluation
    assert ev is not None and ev.champion is not None and ev.champion["version"] == "1.0.0"
    assert not ev.gate.passed and ev.gate.rules
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_label_set_must_match_the_champion(
    shapes_package, shapes_dataset, small_train_config, tmp_path
) -> None:
    champion = tmp_path / "champion"
    shutil.copytree(shapes_package.package.root, champion)
    doc = json.loads((champion / "model.json").read_text())
    doc["labels"] = list(reversed(doc["labels"]))
    (champion / "model.json").write_text(json.dumps(doc))
    with pytest.raises(LabelMismatchError, match="different order"):
        train_package(shapes_dataset, tmp_path / "x", small_train_config(), champion=champion)
    fewer = load_dataset("builtin:shapes?n=30&classes=circle+square+star")
    with pytest.raises(LabelMismatchError, match=r"missing \['ellipse'"):
        train_package(fewer, tmp_path / "x", small_train_config(), champion=shapes_package.package.root)
    assert not (tmp_path / "x").exists()


def test_bad_datasets_fail_before_training_with_a_fix(small_train_config, tmp_path) -> None:
    one = load_dataset("builtin:shapes?n=20&classes=star")
    with pytest.raises(DataError, match="only one class"):
        train_package(one, tmp_path / "a", small_train_config())
    tiny = load_dataset("builtin:shapes?n=2&classes=star+circle")
    with pytest.raises(DataError, match="too small to split"):
        train_package(tiny, tmp_path / "b", small_train_config())
    folder = tmp_path / "data"
    for cls in ("circle", "square", "empty"):
        (folder / cls).mkdir(parents=True)
    from trainer.data import write_imagefolder

    write_imagefolder(load_dataset("builtin:shapes?n=12&classes=circle+square"), tmp_path / "src")
    for p in (tmp_path / "src").glob("*/*.png"):
        shutil.copy(p, folder / p.parent.name / p.name)
    with pytest.raises(DataError, match=r"class\(es\) \['empty'\] have no usable image"):
        train_package(load_dataset(folder), tmp_path / "c", small_train_config())
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown option"):
        load_dataset("builtin:shapes?colour=red")
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))


def test_head_training_is_reproducible_and_resumes_from_checkpoints(tmp_path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    centres = rng.normal(0, 1, (3, 1280)).astype(np.float32)
    x = (centres[y] + rng.normal(0, 2.0, (300, 1280))).astype(np.float32)
    cfg = FitConfig(epochs=12, patience=50, seed=7)

    def run(epochs: int, ckpt: Path | None):  # type: ignore[no-untyped-def]
        torch.set_num_threads(1)
        model = build_classifier(3, seed=7)
        _, suffix = split(model, 0)
        res = fit_suffix(
            suffix,
            x[:200],
            y[:200],
            x[200:],
            y[200:],
            cfg.model_copy(update={"epochs": epochs}),
            num_classes=3,
            checkpoint_dir=ckpt,
            fingerprint="fp",
            progress=False,
        )
        return model._fc.weight.detach().clone(), res

    w1, r1 = run(12, None)
    w2, _ = run(12, None)
    assert torch.equal(w1, w2), "same seed, same data: identical weights"
    assert r1.best_val_accuracy > 0.9
    _, part = run(6, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "best.pt").is_file() and (tmp_path / "ckpt" / "last.pt").is_file()
    assert part.resumed_from is None
    w3, resumed = run(12, tmp_path / "ckpt")
    assert resumed.resumed_from == 5 and resumed.epochs_run == r1.epochs_run
    assert torch.equal(w3, w1), "resuming from last.pt continues the same run"


def test_train_command_writes_a_package_the_agent_runs(tmp_path, feature_cache, capsys) -> None:
    out = tmp_path / "pkg"
    code = edgefleet(
        [
            "train",
            "--data",
            "builtin:shapes?n=20&classes=circle+square+star",
            "--out",
            str(out),
            "--formats",
            "onnx-fp32",
            "--input-size",
            "96",
            "--no-robustness",
            "--epochs",
            "15",
            "--quiet",
            "--feature-cache",
            str(feature_cache),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "wrote" in text and "drift reference" in text and "gate pass" in text
    assert edgefleet(["agent", "selftest", "--package", str(out)]) == 0
    # the same command again refuses to overwrite (exit 2 with a message), keeping the package
    assert (
        edgefleet(
            [
                "train",
                "--data",
                "builtin:shapes?n=20&classes=circle+square+star",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )
    assert load_package(out).manifest.labels == ["circle", "square", "star"]


def test_train_flags_and_config_file_build_the_train_config(tmp_path) -> None:
    from edge_agent.cli import build_parser
    from trainer.cli.build import _train_config

    (tmp_path / "train.yaml").write_text(
        "name: shelf\nfit: {epochs: 7, lr: 0.01}\ngate: {max_slice_drop: 3.0}\n"
    )
    argv = [
        "train",
        "--data",
        "builtin:shapes",
        "--out",
        "x",
        "--config",
        str(tmp_path / "train.yaml"),
        "--epochs",
        "9",
        "--unfreeze",
        "1",
        "--max-ece",
        "-1",
        "--require-gain",
        "lighting=night:5",
        "--corruptions",
        "fog,snow",
        "--formats",
        "onnx-fp32, onnx-int8",
    ]
    cfg = _train_config(build_parser(argv).parse_args(argv))
    assert cfg.name == "shelf" and cfg.fit.epochs == 9 and cfg.fit.lr == 0.01  # flags override the file
    assert cfg.unfreeze_blocks == 1 and cfg.formats == ["onnx-fp32", "onnx-int8"]
    assert (
        cfg.gate.max_ece is None
        and cfg.gate.max_slice_drop == 3.0
        and cfg.gate.min_slice_gain == {"lighting=night": 5.0}
    )
    assert cfg.robustness.corruptions == ["fog", "snow"] and cfg.robustness.enabled
