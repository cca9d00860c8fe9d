"""Why is onnxruntime int8 slow or fast? Quantization variants of one model, timed side by side.

Exports EfficientNet-Lite0 to ONNX fp32 once, then quantizes it with onnxruntime static quantization
in several formats (QDQ vs QOperator, int8 vs uint8 activations, per-channel vs per-tensor weights)
on the same calibration frames, and times each with one intra-op thread on the same input, with the
TFLite fp32/int8 of the package beside them. Results: bench/results/ort_int8.json and a table.

    python -m bench.ort_int8 [--package build/models/lite0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _time(run, x, seconds: float) -> float:
    for _ in range(3):
        run(x)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 10:
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--package", default=str(ROOT / "build" / "models" / "lite0"))
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ort_int8.json"))
    args = ap.parse_args(argv)

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edge_agent.backends import BackendOptions, load_backend
    from edge_agent.package import TensorSpec, load_package
    from edge_agent.preprocess import Preprocessor
    from trainer.data.photos import camera_frames, load_photos

    pkg = load_package(args.package)
    frames = camera_frames(load_photos(), 64, seed=0)
    pre = Preprocessor(pkg.manifest.preprocess, TensorSpec(layout="NCHW"))
    calib = [pre(f)[0] for f in frames]
    x = calib[0]
    held_out = [pre(f)[0] for f in camera_frames(load_photos(), 64, seed=1)]  # not the calibration crops

    def top1(run) -> np.ndarray:
        return np.array([int(np.argmax(run(v))) for v in held_out])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            v = next(self.it, None)
            return None if v is None else {"input": v}

    variants = {
        "QDQ s8 act / s8 weight per-channel": (QuantFormat.QDQ, QuantType.QInt8, True),
        "QDQ u8 act / s8 weight per-channel (shipped)": (QuantFormat.QDQ, QuantType.QUInt8, True),
        "QDQ u8 act / s8 weight per-tensor": (QuantFormat.QDQ, QuantType.QUInt8, False),
        "QOperator u8 act / s8 weight per-channel": (QuantFormat.QOperator, QuantType.QUInt8, True),
    }
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pre_path = Path(tmp) / "pre.onnx"
        quant_pre_process(str(pkg.artifact_path("onnx-fp32")), str(pre_path))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        fp32 = ort.InferenceSession(
            str(pkg.artifact_path("onnx-fp32")), so, providers=["CPUExecutionProvider"]
        )
        results["onnxruntime fp32"] = _time(lambda v: fp32.run(None, {"input": v}), x, args.seconds)
        reference = top1(lambda v: fp32.run(None, {"input": v})[0])
        agreement: dict[str, float] = {}
        for name, (fmt, act, per_channel) in variants.items():
            path = Path(tmp) / "q.onnx"
            quantize_static(
                str(pre_path),
                str(path),
                Reader(),
                quant_format=fmt,
                activation_type=act,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
            )
            s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            results[f"onnxruntime {name}"] = _time(lambda v, s=s: s.run(None, {"input": v}), x, args.seconds)
            agreement[f"onnxruntime {name}"] = float(
                np.mean(top1(lambda v, s=s: s.run(None, {"input": v})[0]) == reference)
            )
            print(
                f"{name:48s} {results[f'onnxruntime {name}']:6.2f} ms  top-1 agreement with fp32 "
                f"{agreement[f'onnxruntime {name}']:.1%}",
                flush=True,
            )
    for key in ("tflite-fp32", "tflite-int8"):
        b = load_backend(pkg, key, BackendOptions(threads=1))
        t = Preprocessor(pkg.manifest.preprocess, pkg.manifest.artifacts[key].input).to_tensor(
            np.zeros((*pkg.manifest.preprocess.size, 3), np.uint8)
        )
        results[f"litert {key}"] = _time(b.run, t, args.seconds)
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    out = {
        "ms_per_frame_1_thread": {k: round(v, 2) for k, v in results.items()},
        "top1_agreement_with_ort_fp32_heldout_crops": {k: round(v, 4) for k, v in agreement.items()},
        "heldout_crops": len(held_out),
        "ort_version": ort.__version__,
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"}),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(
        f"\nvariant (onnxruntime {ort.__version__}, CPU: {' '.join(out['cpu_flags'])})"
        f"{'':10s}ms/frame (1 thread)  top-1 vs fp32"
    )
    for k, v in results.items():
        a = agreement.get(k)
        print(f"{k:60s} {v:7.2f}  {'' if a is None else f'{a:.1%}':>10s}")
    return out


if __name__ == "__main__":
    main()
