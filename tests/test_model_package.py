"""The model package: export of the pretrained model, verification, and failures that leave nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest

from edge_agent.backends import BackendOptions, load_backend
from edge_agent.errors import PackageError
from edge_agent.package import load_package
from edge_agent.postprocess import to_probabilities
from edge_agent.preprocess import Preprocessor
from edge_agent.selftest import self_test

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_pretrained_package_is_complete(pretrained_package: Path) -> None:
    pkg = load_package(pretrained_package)
    m = pkg.manifest
    assert set(m.artifacts) == {"onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"}
    assert len(m.labels) == 1000 and m.labels[285] == "Egyptian cat"
    assert m.preprocess.size == (224, 224) and m.preprocess.color == "RGB"
    int8_in = m.artifacts["tflite-int8"].input
    assert int8_in.dtype == "int8" and int8_in.scale and int8_in.layout == "NHWC"
    for key, art in m.artifacts.items():
        assert (
            art.file in m.files and m.files[art.file].size == (pretrained_package / art.file).stat().st_size
        )
        assert art.top1_agreement is not None and art.check_agreement is not None
        if art.precision == "fp32":
            assert art.top1_agreement >= 0.99, key  # same network, float rounding only
    # int8 agreement depends on the CPU (ONNX Runtime's u8s8 kernels saturate without VNNI): the package
    # records its own floor, and the CPU-independent TFLite int8 artifact meets it wherever it was made.
    check = m.agreement_check
    assert check is not None and 0.5 <= check.floor <= 0.95
    assert m.artifacts["tflite-int8"].check_agreement >= check.floor  # type: ignore[operator]
    assert m.golden and all(g.file in m.files for g in m.golden)
    assert set(m.telemetry_edges) >= {"confidence", "entropy", "margin", "brightness", "log_laplacian_var"}


def test_pretrained_int8_is_checked_on_frames_apart_from_its_calibration(pretrained_package: Path) -> None:
    """ONNX ranges from 512 augmented views, agreement on 256 other crops, and the kept variant is the
    first to reach the target or else the best on its worse kernel path (figures depend on the CPU)."""
    m = load_package(pretrained_package).manifest
    assert m.artifacts["onnx-int8"].quantization["calibration_images"] == 512  # type: ignore[index]
    for key in ("onnx-int8", "tflite-int8"):
        q = m.artifacts[key].quantization
        assert q is not None and q["check_frames"] == 256, key
        worst = {name: min(by_path.values()) for name, by_path in q["variants"].items()}
        assert all(set(by_path) == set(q["kernel_paths"]) for by_path in q["variants"].values())
        kept = q["float_prefix"].split()[1] + " float"  # "first 30% of ..." -> "30% float"
        reached = [name for name, a in worst.items() if a >= 0.97]
        assert kept == (reached[0] if reached else max(worst, key=lambda n: worst[n])), (key, q)
        assert q["chosen_because"].startswith("fewest" if reached else "no variant"), q


def test_cat_photograph_is_a_cat_through_every_artifact(pretrained_package: Path) -> None:
    import skimage

    cat = cv2.imread(str(Path(skimage.__file__).parent / "data" / "chelsea.png"))
    pkg = load_package(pretrained_package)
    for key, art in pkg.manifest.artifacts.items():
        backend = load_backend(pkg, key, BackendOptions())
        x, _ = Preprocessor(pkg.manifest.preprocess, art.input)(cat)
        probs = to_probabilities(backend.run(x), pkg.manifest.output_kind)[0]
        assert int(probs.argmax()) in CAT_CLASSES, (key, pkg.manifest.labels[int(probs.argmax())])
        assert abs(float(probs.sum()) - 1) < 1e-4


def test_golden_inputs_pass_self_test_on_every_artifact(pretrained_package: Path) -> None:
    pkg = load_package(pretrained_package)
    for key in pkg.manifest.artifacts:
        result = self_test(pkg, key)
        assert result.passed, (key, result.failures)
        assert result.golden == len(pkg.manifest.golden) and result.latency_ms is not None
    assert not self_test(pkg, "tflite-int8", latency_budget_ms=0.001).passed


def _copy(pkg: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    return dst


def test_tampered_artifact_is_rejected_with_path_and_check(pretrained_package: Path, tmp_path: Path) -> None:
    pkg = _copy(pretrained_package, tmp_path)
    f = pkg / "model_int8.tflite"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"model_int8\.tflite: sha256 .* does not match"):
        load_package(pkg)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "model_fp32.onnx").unlink(), r"model_fp32\.onnx: listed in model\.json but missing"),
        (lambda p: (p / "model.json").write_text("{not json"), r"model\.json: not valid JSON"),
        (lambda p: (p / "model.json").unlink(), r"model\.json: missing"),
        (lambda p: (p / "model_int8.onnx").write_bytes(b"short"), r"model_int8\.onnx: size 5 does not match"),
        (
            lambda p: (p / "model.json").write_text(
                json.dumps({**json.loads((p / "model.json").read_text()), "temperature": -1})
            ),
            r"field temperature: Input should be greater than 0",
        ),
    ],
)
def test_broken_packages_fail_with_a_clear_error(
    pretrained_package: Path, tmp_path: Path, damage, message: str
) -> None:
    pkg = _copy(pretrained_package, tmp_path)
    damage(pkg)
    with pytest.raises(PackageError, match=message):
        load_package(pkg)
    with pytest.raises(PackageError, match="does not exist"):
        load_package(tmp_path / "nowhere")
