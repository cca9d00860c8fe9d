"""Which int8 recipe holds on both kernel paths: calibration data, method, format, activation type, layers.

    python -m bench.int8_search                     # pretrained Lite0 and one trained package
    python -m bench.int8_search --only pretrained   # one model

Writes bench/results/int8_search.json and prints a table. For each model (the pretrained
EfficientNet-Lite0 at 224 px from ``build/models/lite0``, or exported from torch if absent; a trained
package: built-in shapes plus a night-lit field set, 128 px, as ``bench.int8_bench`` trains it) and each
variant: top-1 agreement of the int8 artifact with the same runtime's fp32 on **check frames kept apart
from the calibration frames** (plain camera crops and augmented ones, seeds of their own), on this CPU's
kernels and on the AVX2-only kernels emulated with ``build/cpuid_mask.so``
(:mod:`trainer.export.kernel_paths`); top-1 delta against fp32 on labelled frames where the model has
labels; ms per frame (one thread, median of single-frame runs, this CPU's kernels); the time to make it.

Variants (issue 9, item 1):

* calibration: today's 128 plain crops vs 512 augmented views (light, blur, noise, scale;
  :mod:`trainer.data.quant_frames`);
* ONNX Runtime: MinMax / Percentile / Entropy ranges, QDQ / QOperator, u8 / s8 activations, float
  prefixes of the first convolutions, and **fragile layers** kept in float: a per-layer error report
  (every quantized activation against the float model's, signal-to-quantization-noise ratio from
  ``onnxruntime.quantization.qdq_loss_debug``, on calibration frames, run on both kernel paths because
  the AVX2 kernels saturate where VNNI does not) ranks each quantized segment by the SQNR it loses, and
  the worst k are excluded;
* TFLite (ai-edge-quantizer): the same calibration sets, float prefixes, and fragile ops from
  ai-edge-quantizer's own per-tensor comparison (``Quantizer.validate``, SNR).

The layer ranking is made on calibration frames, never on the check frames the variants are scored on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.accuracy_bench import cpu_flags

RESULTS = Path(__file__).parent / "results" / "int8_search.json"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- data


def _nchw(frames: list[np.ndarray], spec: Any) -> np.ndarray:
    from edge_agent.package import TensorSpec
    from edge_agent.preprocess import Preprocessor

    pre = Preprocessor(spec, TensorSpec(layout="NCHW", dtype="float32"))
    return np.concatenate([pre(f)[0] for f in frames]).astype(np.float32)


def _pretrained(work: Path) -> dict[str, Any]:
    """Lite0's fp32 artifacts, calibration sets and check frames (no labels)."""
    from trainer.data.photos import camera_frames, load_photos
    from trainer.data.quant_frames import augmented_views
    from trainer.model.pretrained import LITE0_PREPROCESS

    root = ROOT / "build" / "models" / "lite0"
    if not (root / "model_fp32.onnx").is_file():
        from trainer.export.pretrained import export_pretrained

        export_pretrained(root, progress=False, overwrite=True)
    photos = load_photos()
    check = camera_frames(photos, 128, 1000) + augmented_views(camera_frames(photos, 128, 2000), 128, 2001)
    calib = {
        "plain128": camera_frames(photos, 128, 0),
        "aug512": augmented_views(camera_frames(photos, 512, 0), 512, 1),
    }
    spec = LITE0_PREPROCESS
    return {
        "onnx": root / "model_fp32.onnx",
        "tflite": root / "model_fp32.tflite",
        "spec": spec,
        "calib": {k: _nchw(v, spec) for k, v in calib.items()},
        "check": _nchw(check, spec),
        "check_parts": {"plain": slice(0, 128), "augmented": slice(128, 256)},
        "labelled": None,
    }


def _trained(work: Path, seed: int = 1) -> dict[str, Any]:
    """A trained package as bench.int8_bench makes it, its training frames as calibration sources."""
    import contextlib

    from bench.int8_bench import labelled_frames, retrained_data
    from edge_agent.package import load_package
    from trainer.build import TrainConfig, train_package
    from trainer.data.quant_frames import augmented_views
    from trainer.errors import GateError
    from trainer.evaluation.gate import GateRules

    data = retrained_data(seed)
    cfg = (
        TrainConfig.model_validate(  # the settings int8_search.json was measured with (no fine-tuned blocks)
            {
                "name": "search",
                "version": f"2.{seed}.0",
                "input_size": 128,
                "aug_views": 1,
                "progress": False,
                "fit": {"seed": seed},
                "gate": GateRules(max_int8_drop=None, max_ece=None).model_dump(),
            }
        )
    )
    out = work / f"trained-{seed}"
    t0 = time.time()
    if not (out / "model.json").is_file():  # --keep reuses a package trained by an earlier run
        with contextlib.suppress(GateError):
            train_package(data, out, cfg)
    train_s = time.time() - t0
    pkg = load_package(out)
    spec = pkg.manifest.preprocess
    train = [s.frame() for s in data.split("train")]
    val = [s.frame() for s in data.split("val")]
    lab_frames, y = labelled_frames(data)
    return {
        "onnx": out / "model_fp32.onnx",
        "tflite": out / "model_fp32.tflite",
        "spec": spec,
        "calib": {
            "plain128": _nchw(train[:128], spec),
            "aug512": _nchw(augmented_views(train, 512, 1), spec),
        },
        "check": _nchw(val, spec),
        "check_parts": {"val": slice(0, len(val))},
        "labelled": (_nchw(lab_frames, spec), y),
        "train_export_s": round(train_s, 1),
        "recorded": {k: a.quantization for k, a in pkg.manifest.artifacts.items() if a.quantization},
    }


# ---------------------------------------------------------------- running models


def _top1_both(runtime: str, path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    from trainer.export.kernel_paths import top1_by_kernels

    return top1_by_kernels(runtime, path, x if runtime == "onnx" else _nhwc(x))


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _ms_onnx(path: Path, x: np.ndarray, runs: int = 40) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {"input": x[:1]}
    for _ in range(5):
        s.run(None, feed)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feed)
        t.append(time.perf_counter() - t0)
    return round(float(np.median(t)) * 1000, 3)


def _ms_tflite(path: Path, x: np.ndarray, runs: int = 40) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    v = _nhwc(x[:1])
    if d["dtype"] != np.float32:
        scale, zp = d["quantization"]
        v = np.clip(np.round(v / scale + zp), -128, 127).astype(d["dtype"])
    it.set_tensor(d["index"], v)
    for _ in range(5):
        it.invoke()
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        it.invoke()
        t.append(time.perf_counter() - t0)
    return round(float(np.median(t)) * 1000, 3)


MS = {"onnx": _ms_onnx, "tflite": _ms_tflite}


def _score(runtime: str, path: Path, m: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Agreement per kernel path (all check frames and each part), top-1 delta, ms."""
    row: dict[str, Any] = {"agreement": {}, "agreement_parts": {}}
    for kernels, top1 in _top1_both(runtime, path, m["check"]).items():
        hits = top1 == ref["check"]
        row["agreement"][kernels] = round(float(hits.mean()), 4)
        row["agreement_parts"][kernels] = {
            k: round(float(hits[s].mean()), 4) for k, s in m["check_parts"].items()
        }
    if m["labelled"] is not None:
        x, y = m["labelled"]
        for kernels, top1 in _top1_both(runtime, path, x).items():
            row.setdefault("top1_delta_points", {})[kernels] = round(
                float((top1 == y).mean() - ref["labelled_top1"]) * 100, 2
            )
    row["ms"] = MS[runtime](path, m["check"])
    row["x_fp32"] = round(ref["ms"] / row["ms"], 2)
    row["worst_agreement"] = min(row["agreement"].values())
    return row


def _reference(runtime: str, m: dict[str, Any]) -> dict[str, Any]:
    from trainer.export.kernel_paths import TOP1

    x = m["check"] if runtime == "onnx" else _nhwc(m["check"])
    ref: dict[str, Any] = {"check": TOP1[runtime](m[runtime], x), "ms": MS[runtime](m[runtime], m["check"])}
    if m["labelled"] is not None:
        lx, y = m["labelled"]
        top1 = TOP1[runtime](m[runtime], lx if runtime == "onnx" else _nhwc(lx))
        ref["labelled_top1"] = float((top1 == y).mean())
    return ref


# ---------------------------------------------------------------- ONNX Runtime


def _onnx_pre(fp32: Path, work: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "pre.onnx"
    if not pre.exists():
        quant_pre_process(str(fp32), str(pre))
    return pre


class _Reader:
    """Calibration batches of 16 frames (the fp32 graph has a dynamic batch)."""

    def __init__(self, x: np.ndarray) -> None:
        self._x = x
        self._it = iter(range(0, len(x), 16))

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._it, None)
        return None if i is None else {"input": self._x[i : i + 16]}


def _onnx_quantize(pre: Path, out: Path, calib: np.ndarray, cache: Path, v: dict[str, Any]) -> float:
    """quantize_static with variant ``v``; ranges cached per (calibration set, method). Seconds taken."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_Reader, CalibrationDataReader):
        pass

    method = getattr(CalibrationMethod, v.get("method", "MinMax"))
    extra = {"CalibPercentile": 99.999} if v.get("method") == "Percentile" else {}
    t0 = time.time()
    quantize_static(
        str(pre),
        str(out),
        Reader(calib),
        quant_format=QuantFormat.QOperator if v.get("format") == "QOperator" else QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if v.get("act") == "s8" else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=method,
        nodes_to_exclude=v.get("exclude", []),
        extra_options=extra,
        calibration_cache_path=str(cache),
    )
    return round(time.time() - t0, 1)


def _prefix_nodes(pre: Path, share: float) -> list[str]:
    import onnx

    nodes = onnx.load(str(pre)).graph.node
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    k = int(round(share * len(convs)))
    return [n.name for n in nodes[: convs[k - 1] + 1]] if k else []


def _onnx_layer_report(pre: Path, qdq: Path, x: np.ndarray, work: Path) -> list[dict[str, Any]]:
    """Per quantized activation: SQNR (dB) of the int8 model's value against the float model's on both
    kernel paths, and the float nodes of the segment that produces it. The int8 values are read from
    the QuantizeLinear outputs (uint8), which keeps ONNX Runtime's fused int8 kernels in place (reading
    the float tensors around them, as ``modify_model_output_intermediate_tensors`` does, unfuses them)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as sqnr

    from trainer.export.kernel_paths import avx2_mask_library, run_on_avx2_kernels

    q = onnx.load(str(qdq))
    f = onnx.load(str(pre))
    float_tensors = {o for n in f.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    taps = {}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in float_tensors and n.input[1] in inits:
            taps[n.input[0]] = (n.output[0], float(inits[n.input[1]]), int(inits[n.input[2]]))
            q.graph.output.append(
                onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.UINT8, None)
            )
    f = onnx.load(str(pre))
    for t in taps:
        f.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    qpath, fpath, xs = work / "taps_q.onnx", work / "taps_f.onnx", work / "taps_x.npy"
    onnx.save(q, str(qpath))
    onnx.save(f, str(fpath))
    np.save(xs, x)
    runs = {"native": work / "taps_native.npz", "avx2": work / "taps_avx2.npz"}
    child = ["-m", "bench.int8_search", "--run-taps", str(qpath), str(xs)]
    subprocess.run([sys.executable, *child, str(runs["native"])], check=True, cwd=ROOT)
    lib = avx2_mask_library()
    if lib is not None:
        run_on_avx2_kernels(lib, [*child, str(runs["avx2"])])
    else:
        del runs["avx2"]
    subprocess.run(
        [sys.executable, *child[:3], str(fpath), str(xs), str(work / "taps_f.npz")], check=True, cwd=ROOT
    )
    fl = np.load(work / "taps_f.npz")
    got = {k: np.load(p) for k, p in runs.items()}
    producers = {o: n for n in f.graph.node for o in n.output}
    rows = []
    for t, (qname, scale, zp) in taps.items():
        row: dict[str, Any] = {"tensor": t, "nodes": _segment(producers, t, set(taps))}
        for k, arrs in got.items():
            deq = (arrs[qname].astype(np.float32) - zp) * scale
            row[k] = float(np.mean(sqnr(fl[t], deq)))
        rows.append(row)
    return rows


def _segment(producers: dict[str, Any], t: str, quantized: set[str]) -> list[str]:
    """Names of the float-graph nodes between ``t`` and the quantized tensors (or inputs) it comes from."""
    out, todo = [], [t]
    while todo:
        n = producers.get(todo.pop())
        if n is None or n.name in out:
            continue
        out.append(n.name)
        todo += [i for i in n.input if i in producers and i not in quantized]
    return out


def _fragile(
    report: list[dict[str, Any]], producers_in: dict[str, list[str]], k: int, rank: str = "worse"
) -> list[str]:
    """Nodes of the k segments that lose the most SQNR over their quantized input: on the worse kernel
    path (``worse``), or the part of it only the AVX2 kernels lose (``avx2``: saturation)."""
    by = {r["tensor"]: r for r in report}
    paths = [p for p in ("native", "avx2") if p in report[0]]
    loss = []
    for r in report:
        ins = [by[i] for i in producers_in.get(r["tensor"], []) if i in by]
        d = {p: (min(i[p] for i in ins) if ins else 60.0) - r[p] for p in paths}
        drop = d["avx2"] - d["native"] if rank == "avx2" and "avx2" in d else max(d.values())
        loss.append((drop, r))
    loss.sort(key=lambda d: -d[0])
    return [n for _, r in loss[:k] for n in r["nodes"]]


def _segment_inputs(pre: Path, report: list[dict[str, Any]]) -> dict[str, list[str]]:
    """For each reported tensor, the quantized tensors its segment reads."""
    import onnx

    g = onnx.load(str(pre)).graph
    quantized = {r["tensor"] for r in report}
    byname = {n.name: n for n in g.node}
    out = {}
    for r in report:
        ins = {i for name in r["nodes"] for i in byname[name].input if i in quantized}
        out[r["tensor"]] = sorted(ins)
    return out


def _onnx_variants(m: dict[str, Any], work: Path, quick: bool, extra: bool = False) -> dict[str, Any]:
    pre = _onnx_pre(m["onnx"], work)
    ref = _reference("onnx", m)
    res: dict[str, Any] = {"fp32_ms": ref["ms"], "variants": {}}

    def run(name: str, calib: str, **v: Any) -> dict[str, Any]:
        out = work / f"{name}.onnx"
        cache = work / f"cache-{calib}-{v.get('method', 'MinMax')}.json"
        cached = cache.exists()
        secs = _onnx_quantize(pre, out, m["calib"][calib], cache, v)
        row = {"calibration": calib, **{k: (len(x) if k == "exclude" else x) for k, x in v.items()}}
        row.update(_score("onnx", out, m, ref), quantize_s=secs, ranges_cached=cached)
        res["variants"][name] = row
        print(
            f"  onnx {name:34s} {row['agreement']} {row.get('top1_delta_points', '')} {row['ms']} ms, {secs} s",
            flush=True,
        )
        return row

    for calib in ("plain128", "aug512") if not extra else ():
        for share in (0.0, 0.15, 0.3):
            run(f"{calib}-minmax-f{int(share * 100)}", calib, exclude=_prefix_nodes(pre, share))
    # per-layer error report on the all-int8 model, on 32 calibration frames
    base = work / "aug512-minmax-f0.onnx"
    _onnx_quantize(pre, base, m["calib"]["aug512"], work / "cache-aug512-MinMax.json", {})
    report = _onnx_layer_report(pre, base, m["calib"]["aug512"][::16][:32], work)
    res["layer_report"] = [
        {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in report
    ]
    seg_in = _segment_inputs(pre, report)
    for k in (3, 6, 10, 16) if not extra else ():
        run(f"aug512-minmax-fragile{k}", "aug512", exclude=_fragile(report, seg_in, k))
    for k in (3, 6) if not extra else ():
        nodes = sorted(set(_fragile(report, seg_in, k)) | set(_prefix_nodes(pre, 0.15)))
        run(f"aug512-minmax-f15+fragile{k}", "aug512", exclude=nodes)
    for k in (2, 4, 8):
        run(f"aug512-minmax-avx2fragile{k}", "aug512", exclude=_fragile(report, seg_in, k, "avx2"))
    for share in (0.45, 0.6):
        run(f"aug512-minmax-f{int(share * 100)}", "aug512", exclude=_prefix_nodes(pre, share))
    for share in (0.0, 0.3, 0.45):
        run(f"aug512-minmax-f{int(share * 100)}-s8act", "aug512", act="s8", exclude=_prefix_nodes(pre, share))
    if extra:
        return res
    if not quick:
        run("aug512-minmax-f15-s8act", "aug512", act="s8", exclude=_prefix_nodes(pre, 0.15))
        run("aug512-minmax-f30-qoperator", "aug512", format="QOperator", exclude=_prefix_nodes(pre, 0.3))
        # histogram methods hold every activation of every frame in memory (512 frames at 224 px took
        # over 21 GB and were killed): 64 of the augmented frames, with MinMax on the same 64 beside them
        m["calib"]["aug64"] = m["calib"]["aug512"][:64]
        for method in ("MinMax", "Percentile", "Entropy"):
            for share in (0.15, 0.3):
                run(
                    f"aug64-{method.lower()}-f{int(share * 100)}",
                    "aug64",
                    method=method,
                    exclude=_prefix_nodes(pre, share),
                )
    return res


# ---------------------------------------------------------------- TFLite


def _tflite_recipe(float_ops: list[str]) -> Any:
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    rm = recipe_manager.RecipeManager()
    rm.add_static_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        activation_num_bits=8,
        weight_num_bits=8,
    )
    if float_ops:
        names = "^(" + "|".join(re.escape(n) for n in float_ops) + ");$"
        for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED"):
            rm.add_quantization_config(
                regex=names,
                operation_name=getattr(qtyping.TFLOperationName, op),
                algorithm_key=AlgorithmName.NO_QUANTIZE,
            )
    return rm


def _tflite_quantize(fp32: Path, out: Path, qsv: dict[str, Any], float_ops: list[str]) -> Any:
    from ai_edge_quantizer import quantizer

    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe(_tflite_recipe(float_ops).get_quantization_recipe())
    qt.quantize(qsv).export_model(str(out), overwrite=True)
    return qt


def _tflite_ops(fp32: Path) -> list[dict[str, Any]]:
    """Ops in execution order with their input and output tensor names."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(fp32))
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    return [
        {
            "op": o["op_name"],
            "inputs": [names[i] for i in o["inputs"] if i in names],
            "outputs": [names[i] for i in o["outputs"]],
        }
        for o in it._get_ops_details()
    ]


def _tflite_layer_report(qt: Any, x_nhwc: np.ndarray, fp32: Path) -> list[dict[str, Any]]:
    """ai-edge-quantizer's per-tensor comparison (SNR, dB) of every op's output on calibration frames."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer.utils import tfl_interpreter_utils, validation_utils

    sig = tfl_interpreter_utils.DEFAULT_SIGNATURE_KEY
    input_name = Interpreter(model_path=str(fp32)).get_signature_list()[sig]["inputs"][0]
    data = {sig: [{input_name: x_nhwc[i : i + 1]} for i in range(len(x_nhwc))]}
    cmp = qt.validate(
        data, error_metrics=[validation_utils.ValidationErrorMetric.SNR], num_threads=os.cpu_count() or 1
    )
    tensors = cmp.get_all_tensor_results()
    consts = {k for r in cmp._comparison_results.values() for k in r.constant_tensors}
    rows = []
    for op in _tflite_ops(fp32):
        out = op["outputs"][0]
        v = tensors.get(out)
        if v is None:
            continue
        ins = [_db(tensors[i]) for i in op["inputs"] if i in tensors and i not in consts]
        rows.append(
            {"op": op["op"], "tensor": out, "snr_db": _db(v), "input_snr_db": min(ins) if ins else None}
        )
    return rows


def _db(v: Any) -> float:
    """ai-edge-quantizer's SNR (a power ratio) in dB."""
    x = float(next(iter(v.values()))) if isinstance(v, dict) else float(v)
    return round(10 * float(np.log10(max(x, 1e-12))), 2)


def _tflite_variants(m: dict[str, Any], work: Path, quick: bool, extra: bool = False) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    from trainer.export.tflite import _calibrate, _leading_op_outputs

    ref = _reference("tflite", m)
    res: dict[str, Any] = {"fp32_ms": ref["ms"], "variants": {}}
    prefix = _leading_op_outputs(Interpreter(model_path=str(m["tflite"])))
    ranges: dict[str, Any] = {}
    qts: dict[str, Any] = {}

    def run(name: str, calib: str, float_ops: list[str]) -> None:
        t0 = time.time()
        if calib not in ranges:
            ranges[calib] = _calibrate(m["tflite"], _nhwc(m["calib"][calib]), m["spec"])
        calib_s = round(time.time() - t0, 1)
        out = work / f"{name}.tflite"
        t0 = time.time()
        qts[name] = _tflite_quantize(m["tflite"], out, ranges[calib], float_ops)
        row = {
            "calibration": calib,
            "float_ops": len(float_ops),
            "calibrate_s": calib_s,
            "quantize_s": round(time.time() - t0, 1),
        }
        row.update(_score("tflite", out, m, ref))
        res["variants"][name] = row
        print(
            f"  tflite {name:32s} {row['agreement']} {row.get('top1_delta_points', '')} {row['ms']} ms",
            flush=True,
        )

    for share in (0.45, 0.6) if extra else ():
        run(f"aug512-f{int(share * 100)}", "aug512", prefix(share))
    if extra:
        return res
    for calib in ("plain128", "aug512"):
        for share in (0.0, 0.15, 0.3):
            run(f"{calib}-f{int(share * 100)}", calib, prefix(share))
    report = _tflite_layer_report(qts["aug512-f0"], _nhwc(m["calib"]["aug512"][::16][:32]), m["tflite"])
    res["layer_report"] = report
    ranked = sorted(
        (r for r in report if r["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD")),
        key=lambda r: -((r["input_snr_db"] if r["input_snr_db"] is not None else 60.0) - r["snr_db"]),
    )
    for share in (0.45, 0.6):
        run(f"aug512-f{int(share * 100)}", "aug512", prefix(share))
    for k in (3, 6, 10, 16):
        run(f"aug512-fragile{k}", "aug512", [r["tensor"] for r in ranked[:k]])
    for k in (3, 6):
        run(f"aug512-f15+fragile{k}", "aug512", sorted(set(prefix(0.15)) | {r["tensor"] for r in ranked[:k]}))
    return res


# ---------------------------------------------------------------- main


def _table(result: dict[str, Any]) -> str:
    lines = [f"CPU flags: {' '.join(result['machine']['cpu_flags'])}"]
    lines.append(
        f"{'model':10s} {'runtime':7s} {'variant':34s} {'native':>7s} {'avx2':>7s} {'top1 d':>7s} {'ms':>6s} {'x fp32':>6s}"
    )
    for model, runtimes in result["models"].items():
        for runtime, r in runtimes.items():
            if not isinstance(r, dict) or "variants" not in r:
                continue
            for name, v in r["variants"].items():
                a = v["agreement"]
                d = v.get("top1_delta_points", {})
                dd = min(d.values()) if d else None
                lines.append(
                    f"{model:10s} {runtime:7s} {name:34s} {a.get('native', float('nan')):7.1%} {a.get('avx2', float('nan')):7.1%} "
                    f"{'' if dd is None else format(dd, '+7.2f'):>7s} {v['ms']:6.2f} {v['x_fp32']:6.2f}"
                )
    return "\n".join(lines)


def _run_taps(model: str, xs: str, out: str) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    x = np.load(xs)
    names = [o.name for o in s.get_outputs()]
    acc: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(x), 8):
        for n, v in zip(names, s.run(None, {"input": x[i : i + 8]})):
            acc[n].append(v)
    np.savez(out, **{n: np.concatenate(v) for n, v in acc.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("pretrained", "trained"))
    ap.add_argument("--runtime", choices=("onnx", "tflite"))
    ap.add_argument(
        "--quick", action="store_true", help="MinMax QDQ u8 only (no Percentile/Entropy/s8/QOperator)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON (merged into if it exists)")
    ap.add_argument(
        "--extra", action="store_true", help="only the variants added after the first run (merged)"
    )
    ap.add_argument("--keep", type=Path, help="directory that keeps the trained package between runs")
    ap.add_argument("--run-taps", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run_taps:
        _run_taps(*a.run_taps)
        return 0
    result: dict[str, Any] = json.loads(a.out.read_text()) if a.out.exists() else {"models": {}}
    result["machine"] = {
        "cpu_flags": cpu_flags(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    loaders: dict[str, Callable[[Path], dict[str, Any]]] = {"pretrained": _pretrained, "trained": _trained}
    with tempfile.TemporaryDirectory(prefix="int8-search-") as tmp:
        if a.keep:
            a.keep.mkdir(parents=True, exist_ok=True)
        for name, load in loaders.items():
            if a.only and a.only != name:
                continue
            t0 = time.time()
            m = load(a.keep or Path(tmp))
            entry = result["models"].setdefault(name, {})
            entry.update(
                {
                    "check_frames": len(m["check"]),
                    "calibration_sets": {k: len(v) for k, v in m["calib"].items()},
                    "labelled_frames": None if m["labelled"] is None else len(m["labelled"][1]),
                    "load_s": round(time.time() - t0, 1),
                    **(
                        {"train_export_s": m["train_export_s"], "recorded": m["recorded"]}
                        if "recorded" in m
                        else {}
                    ),
                }
            )
            for runtime, fn in (("onnx", _onnx_variants), ("tflite", _tflite_variants)):
                if a.runtime and a.runtime != runtime:
                    continue
                w = Path(tmp, name, runtime)
                w.mkdir(parents=True)
                print(f"{name} {runtime}", flush=True)
                got = fn(m, w, a.quick, a.extra)
                if a.extra and runtime in entry:  # merge into the first run's variants
                    entry[runtime]["variants"].update(got["variants"])
                    entry[runtime].setdefault("extra_runs", []).append({"fp32_ms": got["fp32_ms"]})
                else:
                    entry[runtime] = got
                a.out.write_text(json.dumps(result, indent=1, default=str))
    a.out.write_text(json.dumps(result, indent=1, default=str))
    print(_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
