"""The AVX2-kernel emulation the export measures int8 with: CPUID masking reaches ONNX Runtime's kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.export.kernel_paths import AVX2, NATIVE, ROOT, avx2_mask_library, top1_by_kernels

K = 64
SATURATING_MATMUL = f"""
import numpy as np, onnxruntime as ort
from onnx import helper, TensorProto
b = helper.make_tensor('b', TensorProto.INT8, [{K}, 1], np.full(({K}, 1), 127, np.int8).tobytes(), raw=True)
g = helper.make_graph([helper.make_node('MatMulInteger', ['a', 'b'], ['y'])], 'g',
    [helper.make_tensor_value_info('a', TensorProto.UINT8, [1, {K}])],
    [helper.make_tensor_value_info('y', TensorProto.INT32, [1, 1])], [b])
m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 13)]); m.ir_version = 8
s = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])
print(int(s.run(None, {{'a': np.full((1, {K}), 255, np.uint8)}})[0][0, 0]))
"""


def _mask() -> Path:
    if "cpuid_fault" not in Path("/proc/cpuinfo").read_text().split():
        pytest.skip("this CPU cannot fault on CPUID: the export measures its own kernels only")
    lib = avx2_mask_library()
    if lib is None:
        msg = f"{ROOT / 'build' / 'cpuid_mask.so'} is not built (make build/cpuid_mask.so)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return lib


def test_masked_cpuid_puts_onnxruntime_on_the_saturating_avx2_kernels() -> None:
    """u8 255 x s8 127 over K=64: exact is 2,072,640; AVX2's vpmaddubsw saturates each pair at 32,767."""
    lib = _mask()
    env = {**os.environ, "LD_PRELOAD": str(lib)}
    masked = subprocess.run(
        [sys.executable, "-c", SATURATING_MATMUL], env=env, capture_output=True, text=True
    )
    assert masked.returncode == 0, masked.stderr
    assert int(masked.stdout) == 32767 * (K // 2)
    flags = subprocess.run(
        [
            sys.executable,
            "-c",
            "from numpy._core._multiarray_umath import __cpu_features__ as f; print(f['AVX2'], f['AVX512F'])",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert flags.stdout.split() == ["True", "False"]


def test_an_artifact_is_measured_on_both_kernel_paths(pretrained_package: Path) -> None:
    """The export's measurement returns this CPU's top-1 and the AVX2 kernels' for the same inputs."""
    _mask()
    from edge_agent.package import load_package
    from trainer.data.photos import camera_frames, load_photos
    from trainer.export.package import _float_nchw

    pkg = load_package(pretrained_package)
    x = _float_nchw(camera_frames(load_photos(), 8, 3), pkg.manifest.preprocess)
    by_path = top1_by_kernels("onnx", pkg.artifact_path("onnx-fp32"), x)
    assert set(by_path) == {NATIVE, AVX2}
    assert by_path[NATIVE].shape == by_path[AVX2].shape == (8,)
    assert (by_path[NATIVE] == by_path[AVX2]).mean() >= 7 / 8  # fp32 differs only in rounding
    onnx_q = pkg.manifest.artifacts["onnx-int8"].quantization or {}
    assert onnx_q["kernel_paths"] == [AVX2, NATIVE]
    assert all(set(v) == {AVX2, NATIVE} for v in onnx_q["variants"].values())
    assert np.isfinite([a for v in onnx_q["variants"].values() for a in v.values()]).all()
