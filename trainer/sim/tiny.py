"""Tiny, real model packages for update tests, benchmarks and simulations (no torch, built in ~0.1 s).

Each package holds a small ONNX classifier built with the ``onnx`` helper API: it averages each
colour channel of the input and scores red/green/blue from it (the ColourNet of tests/test_export.py,
without the export pipeline). Golden inputs are solid-colour PNGs with their top-1; the reference
statistics are computed with the agent's own preprocessing, runtime and telemetry aggregator on
``synthetic:`` frames, so a device running it on a synthetic source sees the same distributions.

Behaviours, to exercise the update path with genuinely misbehaving models:

* ``ok``: a healthy model.
* ``nan``: the graph multiplies its logits by NaN (self-test: "output is not finite").
* ``slow``: the logits also depend (times zero) on a chain of 512x512 matrix products, tens to
  hundreds of milliseconds per frame (self-test: latency over budget).
* ``wrong_golden``: golden inputs list the wrong expected class (self-test: top-1 mismatch).
* ``collapse``: model.json sets a softmax temperature of 200; top-1 is unchanged (the self-test passes)
  but confidence collapses to ~1/3 against a reference computed at temperature 1 (health window fails).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_agent.backends.base import BackendOptions, load_backend
from edge_agent.files import write_atomic
from edge_agent.package import (
    MANIFEST,
    Artifact,
    FileEntry,
    GoldenInput,
    ModelManifest,
    ModelPackage,
    PreprocessSpec,
    TensorSpec,
    load_package,
    sha256_file,
)
from edge_agent.postprocess import to_probabilities
from edge_agent.preprocess import Preprocessor
from edge_agent.reference import ReferenceStats
from edge_agent.sources import EndOfStream, open_source
from edge_agent.telemetry.aggregator import FrameResult, TelemetryAggregator
from edge_agent.telemetry.features import input_statistics, output_features
from edge_agent.telemetry.histogram import default_edges

Behaviour = Literal["ok", "nan", "slow", "hang", "wrong_golden", "collapse"]
LABELS = ["red", "green", "blue"]
ARTIFACT = "onnx-fp32"
SIZE = 16
GAIN = 20.0


def _hang(logits: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A Loop of 10^15 additions that the logits depend on (times zero): inference never returns."""
    body = helper.make_graph(
        [
            helper.make_node("Or", ["cond_in", "cond_in"], ["cond_out"]),
            helper.make_node("Add", ["c_in", "ONE"], ["c_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("c_in", TensorProto.FLOAT, ["N"]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("c_out", TensorProto.FLOAT, ["N"]),
        ],
        [numpy_helper.from_array(np.array(1.0, np.float32), "ONE")],
    )
    inits = [
        numpy_helper.from_array(np.array(10**15, np.int64), "TRIPS"),
        numpy_helper.from_array(np.array(True), "TRUE"),
        numpy_helper.from_array(np.array([1], np.int64), "AXH"),
        numpy_helper.from_array(np.array([0.0], np.float32), "ZEROH"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["c0"], axes=[1, 2, 3], keepdims=0),  # input-dependent
        helper.make_node("Loop", ["TRIPS", "TRUE", "c0"], ["spun"], body=body),
        helper.make_node("Unsqueeze", ["spun", "AXH"], ["spun1"]),
        helper.make_node("Mul", ["spun1", "ZEROH"], ["zh"]),
        helper.make_node("Add", [logits, "zh"], ["hung"]),
    ]
    return nodes, inits


def _graph(behaviour: Behaviour, slow_steps: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["means", "W"], ["scores"]),
        helper.make_node("Add", ["scores", "B"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array((np.eye(3) * GAIN).astype(np.float32), "W"),
        numpy_helper.from_array(np.zeros(3, np.float32), "B"),
    ]
    out = "logits"
    if behaviour == "nan":
        inits.append(numpy_helper.from_array(np.array([np.nan], np.float32), "NAN"))
        nodes.append(helper.make_node("Mul", [out, "NAN"], ["poisoned"]))
        out = "poisoned"
    elif behaviour == "slow":
        k = 512
        inits += [
            numpy_helper.from_array(np.ones((1, k, k), np.float32), "FILL"),
            numpy_helper.from_array(np.eye(k, dtype=np.float32), "EYE"),
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "SHAPE"),
            numpy_helper.from_array(np.array([1], np.int64), "AX1"),
            numpy_helper.from_array(np.array([0.0], np.float32), "ZERO"),
        ]
        nodes += [
            helper.make_node("ReduceMean", ["input"], ["s"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Reshape", ["s", "SHAPE"], ["s3"]),
            helper.make_node("Mul", ["s3", "FILL"], ["h0"]),  # depends on the input: never constant-folded
        ]
        for i in range(slow_steps):
            nodes.append(helper.make_node("MatMul", [f"h{i}", "EYE"], [f"h{i + 1}"]))
        nodes += [
            helper.make_node("ReduceMean", [f"h{slow_steps}"], ["r"], axes=[1, 2], keepdims=0),
            helper.make_node("Unsqueeze", ["r", "AX1"], ["r1"]),
            helper.make_node("Mul", ["r1", "ZERO"], ["z"]),
            helper.make_node("Add", [out, "z"], ["slowed"]),
        ]
        out = "slowed"
    elif behaviour == "hang":
        nodes_, inits_ = _hang(out)
        nodes += nodes_
        inits += inits_
        out = "hung"
    graph = helper.make_graph(
        nodes,
        "colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-tiny"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _reference(pkg_dir: Path, manifest: ModelManifest, frames: int = 48) -> ReferenceStats:
    """Reference statistics of the ``ok`` graph at temperature 1, on synthetic frames, via the agent's code."""
    pkg = ModelPackage(pkg_dir, manifest, "0" * 64)
    backend = load_backend(pkg, ARTIFACT, BackendOptions())
    pre = Preprocessor(manifest.preprocess, manifest.artifacts[ARTIFACT].input)
    ref = pkg.ref(ARTIFACT)
    agg = TelemetryAggregator(
        fleet="ref",
        device="ref",
        session=0,
        model=ref,
        agent_version="ref",
        edges=manifest.telemetry_edges,
        now=0.0,
        window_seconds=None,
        window_frames=10**9,
    )
    src = open_source(f"synthetic:?fps=0&frames={frames}&width=160&height=120").start()
    try:
        while True:
            f = src.read(timeout=1.0)
            if f is None:
                continue
            x, small = pre(f.image)
            probs = to_probabilities(backend.run(x), "logits", 1.0)
            (feat,) = output_features(probs)
            agg.add(
                FrameResult(
                    output=feat, inputs=input_statistics(small, manifest.preprocess.color), latency_ms={}
                )
            )
    except EndOfStream:
        pass
    finally:
        src.close()
        backend.close()
    w = agg.close(1.0)
    n = w.frames.inferred
    prior = [w.class_counts.get(c, 0) / n for c in range(len(LABELS))]
    return ReferenceStats(
        artifact=ARTIFACT,
        images=n,
        histograms=w.histograms,
        class_prior=prior,
        mean_confidence=float(w.confidence_mean or 0.0),
    )


def _manifest(
    root: Path, name: str, version: str, behaviour: Behaviour, golden: list[GoldenInput]
) -> ModelManifest:
    files = {
        p.relative_to(root).as_posix(): FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return ModelManifest(
        name=name,
        version=version,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        labels=LABELS,
        preprocess=PreprocessSpec(size=(SIZE, SIZE), resize="squash"),
        temperature=200.0 if behaviour == "collapse" else 1.0,
        artifacts={
            ARTIFACT: Artifact(
                file="model.onnx",
                runtime="onnxruntime",
                precision="fp32",
                input=TensorSpec(name="input", layout="NCHW"),
                output=TensorSpec(layout="NC"),
            )
        },
        golden=golden,
        files=files,
        telemetry_edges=default_edges(len(LABELS)),
        provenance={"builder": "trainer.sim.tiny", "behaviour": behaviour},
    )


def build_tiny_package(
    out: str | Path,
    *,
    version: str = "1.0.0",
    name: str = "colour",
    behaviour: Behaviour = "ok",
    slow_steps: int = 80,
    padding_bytes: int = 0,
    overwrite: bool = False,
) -> ModelPackage:
    """Write a verified tiny package to ``out`` (atomically) and return it loaded."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx.save(_graph("ok", 0), str(tmp / "model.onnx"))  # the reference is always the healthy model's
        reference = _reference(tmp, _manifest(tmp, name, version, behaviour, []))
        onnx.save(_graph(behaviour, slow_steps), str(tmp / "model.onnx"))
        (tmp / "golden").mkdir()
        golden = []
        for c, label in enumerate(LABELS):
            img = np.zeros((24, 24, 3), np.uint8)
            img[..., 2 - c] = 230  # BGR on disk: channel 2 is red
            cv2.imwrite(str(tmp / "golden" / f"{label}.png"), img)
            expected = (c + 1) % 3 if behaviour == "wrong_golden" else c
            golden.append(
                GoldenInput(
                    file=f"golden/{label}.png", expected_top1=expected, expected_label=LABELS[expected]
                )
            )
        if padding_bytes:
            (tmp / "padding.bin").write_bytes(np.random.default_rng(0).bytes(padding_bytes))
        manifest = _manifest(tmp, name, version, behaviour, golden)
        manifest.reference = reference
        data = json.dumps(manifest.model_dump(mode="json", exclude_none=True), indent=1)
        write_atomic(tmp / MANIFEST, data)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_package(out)
