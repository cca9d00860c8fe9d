"""Frame preprocessing driven by model.json: resize policy, colour order, normalisation, layout, int8.

Two steps, both vectorised with OpenCV/numpy:

1. :func:`fit_frame` turns a camera frame (BGR, any size) into the model-input-sized uint8 image in the
   model's colour order. Telemetry's input statistics are computed on this small image.
2. :meth:`Preprocessor.to_tensor` normalises it into the runtime's tensor (NCHW/NHWC, float32 or
   int8/uint8 with the artifact's scale and zero point, fused into one lookup table).

:func:`preprocess_frame` chains both; the trainer imports it so that reference statistics and
calibration data are computed on exactly what a device feeds its runtime.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from edge_agent.errors import EdgeFleetError
from edge_agent.package import PreprocessSpec, TensorSpec

_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


class FrameError(EdgeFleetError, ValueError):
    """A frame cannot be used (empty, wrong shape or type); the pipeline counts and skips it."""


def as_bgr(frame: np.ndarray | None) -> np.ndarray:
    """Validate a decoded frame and bring it to HxWx3 uint8 BGR (grey and BGRA are converted)."""
    if frame is None or not isinstance(frame, np.ndarray) or frame.size == 0:
        raise FrameError("empty frame")
    if frame.dtype != np.uint8:
        if frame.dtype == np.uint16:
            frame = (frame >> 8).astype(np.uint8)
        else:
            raise FrameError(f"unsupported frame dtype {frame.dtype}")
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4):
        raise FrameError(f"unsupported frame shape {frame.shape}")
    if frame.shape[2] == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.shape[0] < 2 or frame.shape[1] < 2:
        raise FrameError(f"frame too small: {frame.shape}")
    return frame


def _resize(image: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize to (width, height). ``area`` downscales by the largest integer factor with OpenCV's
    exact box filter (its fast path) and finishes the remaining < 2x with bilinear: the same anti-aliasing
    as a fractional INTER_AREA at a fifth of the cost (0.15 ms instead of 1.1 ms for 420->224)."""
    if interpolation == "area":
        h, w = image.shape[:2]
        k = int(min(h / size[1], w / size[0]))
        if k >= 2:
            image = image[: h // k * k, : w // k * k]
            image = cv2.resize(
                image, (image.shape[1] // k, image.shape[0] // k), interpolation=cv2.INTER_AREA
            )
        if (image.shape[1], image.shape[0]) == size:
            return image
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return cv2.resize(image, size, interpolation=_INTERPOLATION[interpolation])


def fit_frame(frame_bgr: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Crop/resize a BGR frame to the model input size; returns uint8 HxWx3 in ``spec.color`` order."""
    frame = as_bgr(frame_bgr)
    th, tw = spec.size
    h, w = frame.shape[:2]
    if spec.resize == "center_crop":
        aspect = tw / th
        ch = min(h, w / aspect) * spec.crop_fraction
        cw = ch * aspect
        y0 = int(round((h - ch) / 2))
        x0 = int(round((w - cw) / 2))
        region = frame[y0 : y0 + max(1, int(round(ch))), x0 : x0 + max(1, int(round(cw)))]
        out = _resize(region, (tw, th), spec.interpolation)
    elif spec.resize == "squash":
        out = _resize(frame, (tw, th), spec.interpolation)
    else:  # letterbox
        s = min(th / h, tw / w)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        small = _resize(frame, (nw, nh), spec.interpolation)
        out = np.full((th, tw, 3), spec.pad_value, dtype=np.uint8)
        y0, x0 = (th - nh) // 2, (tw - nw) // 2
        out[y0 : y0 + nh, x0 : x0 + nw] = small
    if spec.color == "RGB":
        out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    return out


class Preprocessor:
    """Normalises model-input-sized frames into one runtime's tensor layout and type."""

    def __init__(self, spec: PreprocessSpec, tensor: TensorSpec) -> None:
        if tensor.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"input layout must be NCHW or NHWC, got {tensor.layout}")
        self.spec = spec
        self.tensor = tensor
        # Normalisation (and int8 quantization) of a uint8 pixel is a per-channel table lookup:
        # one cv2.LUT pass instead of float arithmetic (0.1 ms instead of 1 ms at 224x224).
        mean = np.asarray(spec.mean, dtype=np.float64)
        std = np.asarray(spec.std, dtype=np.float64)
        real = (np.arange(256, dtype=np.float64)[:, None] - mean[None, :]) / std[None, :]  # 256 x 3
        if tensor.dtype == "float32":
            table = real.astype(np.float32)
        else:
            assert tensor.scale is not None and tensor.zero_point is not None
            lo, hi = (-128, 127) if tensor.dtype == "int8" else (0, 255)
            q = np.clip(np.round(real / tensor.scale + tensor.zero_point), lo, hi).astype(np.int16)
            table = (q & 0xFF).astype(np.uint8)  # int8 values as their two's-complement bytes
        self._dtype = np.dtype(tensor.dtype)
        self._lut3 = np.ascontiguousarray(table.reshape(1, 256, 3))
        self._luts = [np.ascontiguousarray(table[:, c].reshape(1, 256)) for c in range(3)]
        h, w = spec.size
        self._shape = (1, 3, h, w) if tensor.layout == "NCHW" else (1, h, w, 3)

    def to_tensor(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 (model colour order, model size) -> 1xCxHxW or 1xHxWxC runtime tensor."""
        if self.tensor.layout == "NHWC":
            x = cv2.LUT(image, self._lut3)
        else:
            x = np.empty(self._shape[1:], dtype=self._lut3.dtype)
            for c, channel in enumerate(cv2.split(image)):
                x[c] = cv2.LUT(channel, self._luts[c])
        if self._dtype == np.int8:
            x = x.view(np.int8)
        return x[None]

    def __call__(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full preprocessing of one camera frame: (runtime tensor, model-input-sized image)."""
        image = fit_frame(frame_bgr, self.spec)
        return self.to_tensor(image), image


@lru_cache(maxsize=16)
def _cached(spec_json: str, tensor_json: str) -> Preprocessor:
    return Preprocessor(
        PreprocessSpec.model_validate_json(spec_json), TensorSpec.model_validate_json(tensor_json)
    )


def preprocess_frame(frame_bgr: np.ndarray, spec: PreprocessSpec, tensor: TensorSpec) -> np.ndarray:
    """One BGR camera frame -> the runtime tensor (batch of 1), exactly as the agent computes it."""
    return _cached(spec.model_dump_json(), tensor.model_dump_json())(frame_bgr)[0]
