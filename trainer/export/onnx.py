"""The ONNX artifacts: fp32 export (dynamic batch) and static QDQ int8 with onnxruntime quantization
(uint8 activations, per-channel int8 weights, MinMax calibration, a float prefix chosen by agreement)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent.package import (
    PreprocessSpec,
)
from trainer.export.float_prefix import search_float_prefix
from trainer.export.kernel_paths import agrees_by_kernels, onnx_top1


def export_onnx_fp32(model: torch.nn.Module, spec: PreprocessSpec, path: Path) -> None:
    h, w = spec.size
    dummy = torch.zeros(1, 3, h, w)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def _quantize_onnx(
    pre: Path,
    out: Path,
    calib: np.ndarray,
    cache: Path,
    float_share: float = 0.0,
    reduce_range: bool = False,
) -> None:
    """Static QDQ int8 (u8 activations, s8 per-channel weights, MinMax) of the pre-processed graph,
    keeping every node before the given share of the convolutions in float. The ranges are computed
    once and kept in ``cache`` for the next variant. ``reduce_range`` (7-bit weights) cannot saturate on
    CPUs without VNNI, but cost 24 points of agreement on Lite0 (65.6% vs 89.1%), so it is not used."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        """Batches of 16 frames (the graph's batch is dynamic): fewer runs of the augmented graph."""

        def __init__(self) -> None:
            self._it = iter(calib[i : i + 16] for i in range(0, len(calib), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"input": x}

    nodes = onnx.load(str(pre)).graph.node  # topologically sorted
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    k = int(round(float_share * len(convs)))
    exclude = [n.name for n in nodes[: convs[k - 1] + 1]] if k else []
    quantize_static(
        str(pre),
        str(out),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=reduce_range,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=exclude,
        calibration_cache_path=str(cache),
    )


def quantize_onnx_int8(fp32: Path, out: Path, calib: np.ndarray, check_x: np.ndarray) -> dict[str, Any]:
    """The fewest leading layers in float that reach :data:`AGREEMENT_TARGET` on the check frames, on
    this CPU's kernels and on the saturating AVX2 kernels of CPUs without VNNI where they can be run here
    (:mod:`trainer.export.kernel_paths`; see :func:`quantize_tflite_int8` for why early layers). Devices
    still check the result on their own CPU (:mod:`edge_agent.agreement`)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ref = onnx_top1(fp32, check_x)
    pre, cache = out.with_suffix(".pre.onnx"), out.with_suffix(".ranges.json")
    quant_pre_process(str(fp32), str(pre))  # fold BatchNorm into Conv before choosing ranges
    try:
        prefix = search_float_prefix(
            out,
            lambda path, share: _quantize_onnx(pre, path, calib, cache, share),
            lambda path: agrees_by_kernels("onnx", path, check_x, ref),
        )
    finally:
        pre.unlink(missing_ok=True)
        cache.unlink(missing_ok=True)
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activations": "uint8 asymmetric",
        "weights": "int8 per-channel symmetric",
        **prefix,
        "check_frames": len(check_x),
        "calibration": "MinMax on augmented views (light, blur, noise, scale) of the calibration frames; "
        "ranges computed once, shared by every variant",
        "calibration_images": len(calib),
    }
