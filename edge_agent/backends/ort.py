"""ONNX Runtime backend (CPU execution provider)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_agent.backends.base import Backend, BackendOptions
from edge_agent.package import TensorSpec


class OrtBackend(Backend):
    """Runs fp32 or QDQ-int8 ONNX models; the batch axis must be dynamic for batch > 1."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, input: TensorSpec, output: TensorSpec, options: BackendOptions) -> None:
        super().__init__(path, input, output, options)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads burn a core between frames on a 2-core board for no gain here.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self._in_name = input.name or self._session.get_inputs()[0].name
        self._out_name = output.name or self._session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        (y,) = self._session.run([self._out_name], {self._in_name: batch})
        return self._dequantize(y)

    def close(self) -> None:
        del self._session
