"""ImageNet-C corruptions: frames of any size in and out, reproducible, and stronger with severity."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from trainer.data.corruptions import CORRUPTIONS, FAMILIES, SEVERITIES, corrupt, plasma_fractal
from trainer.data.scenes import CLASSES, Domain, render_frame

# The paper's own constants are not monotone for these two at severity 2 -> 3: the maintainers' AlexNet
# errors on ImageNet-C are elastic 52.6, 70.1, 55.7, 64.1, 80.6 and snow 71.7, 88.4, 86.5, 91.9, 95.0
# (hendrycks/robustness issue #10). We reproduce that shape instead of "fixing" the benchmark.
NOT_MONOTONE_IN_THE_PAPER = {"elastic_transform", "snow"}


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Camera-like frames: real photographs (scikit-image) and rendered scenes, 320x240."""
    from trainer.data.photos import load_photos

    photos = [
        cv2.resize(p, (320, 240), interpolation=cv2.INTER_AREA)
        for p in load_photos(["chelsea", "coffee", "astronaut", "rocket"]).values()
    ]
    return photos + [render_frame(CLASSES[i], Domain(), np.random.default_rng(i)) for i in (0, 3, 7)]


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_any_frame_size_in_same_size_out_and_reproducible(name: str) -> None:
    for h, w in ((240, 320), (61, 97), (480, 640)):
        f = render_frame("star", Domain(), np.random.default_rng(1), (w, h))
        out = corrupt(f, name, 3, rng=np.random.default_rng(7))
        assert out.shape == f.shape and out.dtype == np.uint8
        assert np.array_equal(out, corrupt(f, name, 3, rng=np.random.default_rng(7)))
        assert not np.array_equal(out, f)
    assert corrupt(f, name, 0) is f


def test_bad_arguments_are_rejected() -> None:
    f = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(f, "frost", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(f, "fog", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(f.astype(np.float32), "fog", 1)
    assert sorted(c for fam in FAMILIES.values() for c in fam) == sorted(CORRUPTIONS)
    p = plasma_fractal(256, 2.0, np.random.default_rng(0))
    assert p.shape == (256, 256) and p.min() == 0.0 and p.max() == 1.0


def test_effect_grows_with_severity(frames: list[np.ndarray]) -> None:
    """Distance from the clean frame in the pretrained backbone's feature space (what a classifier sees)."""
    from trainer.model.backbone import build_classifier, split
    from trainer.model.features import FeatureExtractor
    from trainer.model.pretrained import LITE0_PREPROCESS

    prefix, _ = split(build_classifier(2, 0), 0)
    fx = FeatureExtractor(prefix, LITE0_PREPROCESS)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    clean = unit(fx(frames))
    for ci, name in enumerate(CORRUPTIONS):
        effect = []
        for s in SEVERITIES:
            bad = [corrupt(f, name, s, np.random.default_rng([ci, s, i])) for i, f in enumerate(frames)]
            effect.append(float(np.mean(1 - (unit(fx(bad)) * clean).sum(1))))
        assert effect[0] > 0.005, (name, effect)
        if name in NOT_MONOTONE_IN_THE_PAPER:
            assert effect[4] > effect[3] > effect[2] and effect[4] > effect[0], (name, effect)
        else:
            assert all(b > a for a, b in zip(effect, effect[1:])), (name, effect)
