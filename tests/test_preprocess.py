"""Preprocessing: geometry of each resize policy, exact normalisation, int8 quantization, bad frames."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.package import PreprocessSpec, TensorSpec
from edge_agent.preprocess import FrameError, Preprocessor, as_bgr, fit_frame, preprocess_frame


def _frame(h: int = 480, w: int = 640) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_center_crop_keeps_the_centre() -> None:
    frame = np.zeros((400, 800, 3), np.uint8)
    frame[:, 200:600] = (0, 0, 255)  # red (BGR) square in the middle, black sides
    out = fit_frame(frame, PreprocessSpec(size=(100, 100), resize="center_crop", color="RGB"))
    assert out.shape == (100, 100, 3)
    assert (out[..., 0] > 250).all() and (out[..., 2] < 5).all()  # all red after BGR->RGB


def test_squash_and_letterbox_keep_the_whole_frame() -> None:
    frame = np.zeros((400, 800, 3), np.uint8)
    frame[:, :100] = 255  # a white band on the left edge
    sq = fit_frame(frame, PreprocessSpec(size=(64, 64), resize="squash"))
    lb = fit_frame(frame, PreprocessSpec(size=(64, 64), resize="letterbox", pad_value=0))
    assert sq[:, :4].mean() > 200
    assert lb[:16].max() == 0 and lb[48:].max() == 0  # padded top and bottom bands
    assert lb[20:44, :4].mean() > 200


def test_float_tensor_matches_formula_in_both_layouts() -> None:
    spec = PreprocessSpec(size=(32, 48), mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0), color="RGB")
    frame = _frame()
    small = fit_frame(frame, spec)
    ref = (small.astype(np.float64) - np.array(spec.mean)) / np.array(spec.std)
    nhwc = Preprocessor(spec, TensorSpec(layout="NHWC")).to_tensor(small)
    nchw = Preprocessor(spec, TensorSpec(layout="NCHW")).to_tensor(small)
    assert nhwc.shape == (1, 32, 48, 3) and nchw.shape == (1, 3, 32, 48)
    np.testing.assert_allclose(nhwc[0], ref, atol=1e-5)
    np.testing.assert_allclose(nchw[0], ref.transpose(2, 0, 1), atol=1e-5)


def test_int8_tensor_is_quantized_normalised_pixels() -> None:
    spec = PreprocessSpec(size=(16, 16))
    t = TensorSpec(layout="NHWC", dtype="int8", scale=1 / 128, zero_point=-1)
    small = fit_frame(_frame(), spec)
    x = Preprocessor(spec, t).to_tensor(small)
    assert x.dtype == np.int8
    expected = np.clip(np.round((small.astype(np.float64) - 127) / 128 * 128 - 1), -128, 127)
    np.testing.assert_array_equal(x[0], expected.astype(np.int8))
    assert x.min() >= -128 and x.max() <= 127


def test_preprocess_frame_is_the_agents_function() -> None:
    spec = PreprocessSpec()
    t = TensorSpec(layout="NCHW")
    frame = _frame()
    np.testing.assert_array_equal(preprocess_frame(frame, spec, t), Preprocessor(spec, t)(frame)[0])


@pytest.mark.parametrize(
    "bad",
    [None, np.zeros((0, 0, 3), np.uint8), np.zeros((10, 10, 5), np.uint8), np.zeros((10, 10, 3), np.float32)],
)
def test_bad_frames_raise_frame_error(bad: object) -> None:
    with pytest.raises(FrameError):
        as_bgr(bad)  # type: ignore[arg-type]


def test_grey_and_bgra_frames_are_accepted() -> None:
    assert as_bgr(np.zeros((10, 12), np.uint8)).shape == (10, 12, 3)
    assert as_bgr(np.zeros((10, 12, 4), np.uint8)).shape == (10, 12, 3)
