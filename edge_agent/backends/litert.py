"""LiteRT backend (``ai_edge_litert``, falling back to ``tflite_runtime`` where only that exists)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover - depends on the board's install
    from tflite_runtime.interpreter import Interpreter

from edge_agent.backends.base import Backend, BackendOptions
from edge_agent.package import TensorSpec


class LiteRTBackend(Backend):
    """Runs .tflite models with XNNPACK; a fixed batch size, partial batches are padded."""

    runtime = "litert"

    def __init__(self, path: Path, input: TensorSpec, output: TensorSpec, options: BackendOptions) -> None:
        super().__init__(path, input, output, options)
        self._interp = Interpreter(model_path=str(path), num_threads=options.threads)
        inp = self._interp.get_input_details()[0]
        if options.batch != int(inp["shape"][0]):
            shape = list(inp["shape"])
            shape[0] = options.batch
            self._interp.resize_tensor_input(inp["index"], shape)
        self._interp.allocate_tensors()
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]
        self._batch = int(self._in["shape"][0])

    def run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if n != self._batch:
            if n > self._batch:
                raise ValueError(f"batch of {n} exceeds the interpreter's {self._batch}")
            pad = np.zeros((self._batch - n, *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, pad])
        self._interp.set_tensor(self._in["index"], batch)
        self._interp.invoke()
        return self._dequantize(self._interp.get_tensor(self._out["index"])[:n])

    def close(self) -> None:
        del self._interp
