"""Top-1 of an artifact on this CPU's int8 kernels and on the AVX2 kernels of CPUs without AVX-512/VNNI.

ONNX Runtime's u8 x s8 kernels are exact with VNNI and saturate pairs of products at int16 without it
(AVX2 ``vpmaddubsw``): the pretrained Lite0's ONNX int8 agreed with fp32 on 84% of held-out crops here
and on 60% on the AVX2 kernels. Where this CPU can fault on CPUID, ``build/cpuid_mask.so``
(tools/cpuid_mask) runs a child process on those kernels, so the export chooses a variant that holds on
both kinds of CPU; elsewhere only this CPU's kernels are measured, and the result says so.

    python trainer/export/kernel_paths.py onnx model_int8.onnx inputs.npy top1.npy   # the child
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from trainer.errors import ExportError

ROOT = Path(__file__).resolve().parents[2]
MASK_ENV = "EDGEFLEET_CPUID_MASK"
"""Path of the CPUID-masking library; default ``build/cpuid_mask.so`` of the checkout; ``off`` disables."""
NATIVE, AVX2 = "native", "avx2"


def avx2_mask_library() -> Path | None:
    """The CPUID-masking library if it is built and this CPU can fault on CPUID, else ``None``."""
    setting = os.environ.get(MASK_ENV, "")
    if setting == "off":
        return None
    lib = Path(setting) if setting else ROOT / "build" / "cpuid_mask.so"
    cpuinfo = Path("/proc/cpuinfo")
    if not lib.is_file() or not cpuinfo.is_file() or "cpuid_fault" not in cpuinfo.read_text().split():
        return None
    return lib


def onnx_top1(path: Path, x: np.ndarray) -> np.ndarray:
    """Top-1 of an ONNX model on float NCHW inputs, with ONNX Runtime's CPU kernels."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {"input": x[i : i + 32]})[0] for i in range(0, len(x), 32)]
    return np.concatenate(outs).argmax(1)


def tflite_top1(path: Path, x: np.ndarray) -> np.ndarray:
    """Top-1 of a TFLite model on float NHWC inputs (quantizing them for an integer input tensor)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
    interp.allocate_tensors()
    i, o = interp.get_input_details()[0], interp.get_output_details()[0]
    out = []
    for k in range(len(x)):
        v = x[k : k + 1]
        if i["dtype"] != np.float32:
            scale, zp = i["quantization"]
            info = np.iinfo(i["dtype"])
            v = np.clip(np.round(v / scale + zp), info.min, info.max).astype(i["dtype"])
        interp.set_tensor(i["index"], v)
        interp.invoke()
        out.append(interp.get_tensor(o["index"])[0].astype(np.float32))
    return np.stack(out).argmax(1)


TOP1 = {"onnx": onnx_top1, "tflite": tflite_top1}


def top1_by_kernels(runtime: str, path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Top-1 on this CPU's kernels and, where :func:`avx2_mask_library` allows, on the AVX2 kernels."""
    result = {NATIVE: TOP1[runtime](path, x)}
    lib = avx2_mask_library()
    if lib is not None:
        result[AVX2] = _top1_in_masked_child(lib, runtime, path, x)
    return result


def agrees_by_kernels(runtime: str, path: Path, x: np.ndarray, ref: np.ndarray) -> dict[str, np.ndarray]:
    """Per kernel path (:func:`top1_by_kernels`), whether each input's top-1 equals ``ref``'s."""
    return {kernels: top1 == ref for kernels, top1 in top1_by_kernels(runtime, path, x).items()}


def run_on_avx2_kernels(lib: Path, argv: list[str], timeout: float = 600) -> None:
    """Run ``python argv...`` from the checkout with ``lib`` preloaded (the AVX2 kernels); an
    :class:`ExportError` with the end of its stderr if it fails."""
    env = {**os.environ, "LD_PRELOAD": str(lib)}
    done = subprocess.run(
        [sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise ExportError(f"{' '.join(argv[:4])} on the AVX2 kernels failed (rc {done.returncode}): {tail}")


def _top1_in_masked_child(lib: Path, runtime: str, path: Path, x: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="kernels-") as tmp:
        inputs, output = Path(tmp, "x.npy"), Path(tmp, "top1.npy")
        np.save(inputs, x)
        # run the file, not ``-m``: the package's __init__ imports torch (3 s more per variant); run_path
        # keeps this directory (its onnx.py) off sys.path, which running it as a script would not
        run = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        run_on_avx2_kernels(lib, ["-c", run, __file__, runtime, str(path), str(inputs), str(output)])
        return np.load(output)


def main(argv: list[str] | None = None) -> int:
    """The child: top-1 of one artifact on the inputs, written as .npy."""
    runtime, path, inputs, output = argv if argv is not None else sys.argv[1:]
    np.save(output, TOP1[runtime](Path(path), np.load(inputs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
