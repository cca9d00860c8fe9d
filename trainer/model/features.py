"""Backbone features, computed once per image (and augmented view) and cached.

Only the suffix of the network trains (see :mod:`trainer.model.backbone`), so the frozen prefix's output for
an image never changes during training: it is computed once, from the exact edge preprocessing
(:class:`edge_agent.preprocess.Preprocessor`), and reused by every epoch. The prefix runs through
ONNX Runtime (an export of the same fp32 weights): on this project's 2-core machines it is about 5x
faster than eager PyTorch for EfficientNet-Lite0's depthwise convolutions. Its outputs are checked
against PyTorch when the extractor is built and it falls back to PyTorch if they ever disagree.

:class:`FeatureCache` optionally persists features on disk, keyed by the prefix configuration, the
image's sha256 and the view, so a retraining run on the original plus new data (the fleet loop)
computes features only for the new images.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent.package import PreprocessSpec, TensorSpec
from edge_agent.preprocess import Preprocessor

log = logging.getLogger(__name__)

_CHECK_TOLERANCE = 1e-3


def float_input(frames: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """BGR camera frames -> the fp32 NCHW batch a device's fp32 artifact would be fed."""
    pre = Preprocessor(spec, TensorSpec(layout="NCHW", dtype="float32"))
    h, w = spec.size
    out = np.empty((len(frames), 3, h, w), np.float32)
    for i, f in enumerate(frames):
        out[i] = pre(f)[0][0]
    return out


class FeatureExtractor:
    """Runs a frozen torch module on preprocessed frames, through ONNX Runtime when it matches torch."""

    def __init__(
        self,
        prefix: torch.nn.Module,
        spec: PreprocessSpec,
        *,
        threads: int | None = None,
        batch: int = 32,
        runtime: str = "onnxruntime",
    ) -> None:
        self.prefix = prefix.eval()
        self.spec = spec
        self.batch = batch
        self.threads = threads or max(1, os.cpu_count() or 1)
        self._session = None
        if runtime == "onnxruntime":
            self._session = self._ort_session()
        elif runtime != "torch":
            raise ValueError(f"runtime must be onnxruntime or torch, got {runtime!r}")
        self.runtime = "onnxruntime" if self._session is not None else "torch"

    def _ort_session(self) -> Any:
        import onnxruntime as ort

        h, w = self.spec.size
        buf = io.BytesIO()
        with warnings.catch_warnings():  # the exporter's constant-folding notes are not actionable
            warnings.simplefilter("ignore")
            torch.onnx.export(
                self.prefix,
                (torch.zeros(1, 3, h, w),),
                buf,  # type: ignore[arg-type]
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                opset_version=17,
                dynamo=False,
            )
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        session = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
        with torch.inference_mode():
            want = self.prefix(torch.from_numpy(x)).numpy()
        got = session.run(None, {"x": x})[0]
        err = float(np.abs(want - got).max())
        if not err <= _CHECK_TOLERANCE * max(1.0, float(np.abs(want).max())):
            log.warning("ONNX Runtime prefix differs from torch by %.2g; using torch", err)
            return None
        return session

    def run_tensor(self, x: np.ndarray) -> np.ndarray:
        """Prefix outputs for an already preprocessed fp32 NCHW batch."""
        if self._session is not None:
            return np.asarray(self._session.run(None, {"x": x})[0])
        with torch.inference_mode():
            return self.prefix(torch.from_numpy(x)).numpy()

    def __call__(
        self, frames: Sequence[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Prefix outputs for BGR camera frames (preprocessed exactly as on a device)."""
        outs = []
        for i in range(0, len(frames), self.batch):
            chunk = frames[i : i + self.batch]
            outs.append(self.run_tensor(float_input(chunk, self.spec)))
            if progress:
                progress(len(chunk))
        if not outs:
            raise ValueError("no frames to extract features from")
        return np.concatenate(outs)


def prefix_fingerprint(unfreeze_blocks: int, spec: PreprocessSpec, augmentation: str) -> str:
    """Identity of everything that determines a cached feature besides the image and the view."""
    from trainer.model.pretrained import weights_path

    text = f"lite0:{weights_path().stat().st_size}:{unfreeze_blocks}:{spec.model_dump_json()}:{augmentation}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FeatureCache:
    """Features by (image sha256, view), in memory and optionally on disk under ``root/fingerprint``."""

    def __init__(self, fingerprint: str, root: str | Path | None = None) -> None:
        self.fingerprint = fingerprint
        self.dir = Path(root) / fingerprint if root is not None else None
        self._mem: dict[tuple[str, int], np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def _path(self, sha: str, view: int) -> Path:
        assert self.dir is not None
        return self.dir / sha[:2] / f"{sha}.{view}.npy"

    def get(self, sha: str, view: int) -> np.ndarray | None:
        key = (sha, view)
        if key in self._mem:
            self.hits += 1
            return self._mem[key]
        if self.dir is not None:
            p = self._path(sha, view)
            if p.is_file():
                try:
                    arr = np.load(p, allow_pickle=False)
                except (OSError, ValueError):
                    arr = None  # a torn write from an interrupted run: recompute it
                if arr is not None:
                    self._mem[key] = arr
                    self.hits += 1
                    return arr
        self.misses += 1
        return None

    def put(self, sha: str, view: int, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, dtype=np.float32)
        self._mem[(sha, view)] = value
        if self.dir is not None:
            p = self._path(sha, view)
            p.parent.mkdir(parents=True, exist_ok=True)
            # a cache: renamed into place so readers never see half a file, but not fsynced (a lost entry
            # is recomputed; an fsync per entry would slow feature extraction)
            tmp = p.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, value, allow_pickle=False)
            os.replace(tmp, p)
