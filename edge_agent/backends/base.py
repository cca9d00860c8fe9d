"""The backend interface and the lazy runtime registry."""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.errors import BackendError
from edge_agent.package import Artifact, ModelPackage, TensorSpec

_RUNTIMES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # runtime name -> (module, class, importable distributions any of which provides it)
    "onnxruntime": ("edge_agent.backends.ort", "OrtBackend", ("onnxruntime",)),
    "litert": ("edge_agent.backends.litert", "LiteRTBackend", ("ai_edge_litert", "tflite_runtime")),
}


class BackendOptions(BaseModel):
    """Options every runtime honours."""

    model_config = ConfigDict(extra="forbid")
    threads: int = Field(default=1, ge=1, le=64)
    """Intra-op threads of the runtime."""
    batch: int = Field(default=1, ge=1, le=64)
    """Frames per inference call; the pipeline never waits to fill a batch."""


class Backend(ABC):
    """One loaded artifact that turns a batch of input tensors into float32 outputs."""

    runtime: ClassVar[str]

    def __init__(self, path: Path, input: TensorSpec, output: TensorSpec, options: BackendOptions) -> None:
        self.path = path
        self.input = input
        self.output = output
        self.options = options

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch (N x input shape) and return the output as float32 rows (dequantized)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release runtime resources."""

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        if self.output.dtype == "float32":
            return y.astype(np.float32, copy=False)
        assert self.output.scale is not None and self.output.zero_point is not None
        return (y.astype(np.float32) - np.float32(self.output.zero_point)) * np.float32(self.output.scale)


def runtime_available(runtime: str) -> bool:
    """Whether a runtime's Python package is importable here (without importing it)."""
    if runtime not in _RUNTIMES:
        return False
    return any(importlib.util.find_spec(mod) is not None for mod in _RUNTIMES[runtime][2])


def available_runtimes() -> list[str]:
    return [r for r in _RUNTIMES if runtime_available(r)]


def backend_class(runtime: str) -> type[Backend]:
    if runtime not in _RUNTIMES:
        raise BackendError(f"unknown runtime {runtime!r} (known: {', '.join(_RUNTIMES)})")
    module, cls, _ = _RUNTIMES[runtime]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise BackendError(f"runtime {runtime!r} is not installed: {exc}") from None


def load_backend(package: ModelPackage, artifact: str, options: BackendOptions | None = None) -> Backend:
    """Load one artifact of a package with its runtime."""
    try:
        art: Artifact = package.manifest.artifacts[artifact]
    except KeyError:
        known = ", ".join(package.manifest.artifacts)
        raise BackendError(f"{package.root}: no artifact {artifact!r} (has: {known})") from None
    cls = backend_class(art.runtime)
    try:
        return cls(package.artifact_path(artifact), art.input, art.output, options or BackendOptions())
    except BackendError:
        raise
    except Exception as exc:  # runtimes raise their own types for corrupt or unsupported models
        raise BackendError(
            f"{package.artifact_path(artifact)}: {art.runtime} cannot load it: {exc}"
        ) from None
