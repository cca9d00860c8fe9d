"""Does an artifact compute what the model computes, on this CPU? Top-1 agreement with fp32 references.

A package carries an agreement check (``model.json`` ``agreement_check``): at least 32 inputs, many of
them low-confidence, with the torch fp32 probabilities the trainer computed. int8 kernels differ by CPU
(ONNX Runtime's u8 x s8 path saturates on x86 CPUs without VNNI: measured 59-67% top-1 agreement with
fp32 on such a CPU against 89.8% on a VNNI one), so the agent runs every artifact on these inputs on its
own CPU and only artifacts that reach the package's floor may serve (:mod:`edge_agent.backends.select`,
and the updater's self-test through :mod:`edge_agent.selftest`).

    check = load_check(package)                # None for packages made before the check existed
    result = measure_agreement(package, "onnx-int8", check)
    result.eligible, result.describe()         # (False, "onnx-int8: top-1 agreement 59.4% < floor 90.0% ...")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.backends.base import Backend, BackendOptions, load_backend
from edge_agent.errors import PackageError
from edge_agent.package import ModelPackage
from edge_agent.postprocess import to_probabilities
from edge_agent.preprocess import Preprocessor


@dataclass(frozen=True)
class CheckInputs:
    """The decoded agreement check of a package: model-size images and fp32 reference probabilities."""

    images: np.ndarray
    reference: np.ndarray
    floor: float


@dataclass(frozen=True)
class AgreementResult:
    """One artifact against the fp32 reference on this device."""

    artifact: str
    agreement: float
    """Share of check inputs whose top-1 equals the reference's."""
    distance: float
    """Mean total-variation distance between the artifact's and the reference's probabilities (0..1)."""
    inputs: int
    floor: float

    @property
    def eligible(self) -> bool:
        return self.agreement >= self.floor

    def describe(self) -> str:
        verdict = ">=" if self.eligible else "<"
        return (
            f"{self.artifact}: top-1 agreement {self.agreement:.1%} {verdict} floor {self.floor:.1%} "
            f"on {self.inputs} check inputs (mean output distance {self.distance:.3f})"
        )


def load_check(package: ModelPackage) -> CheckInputs | None:
    """The package's agreement check, decoded and shape-checked; ``None`` if the package has none."""
    spec = package.manifest.agreement_check
    if spec is None:
        return None
    path = package.path(spec.file)
    try:
        with np.load(path, allow_pickle=False) as data:
            images, reference = data["images"], data["probabilities"]
    except (OSError, KeyError, ValueError) as exc:
        raise PackageError(f"{path}: unreadable agreement check ({exc})") from None
    h, w = package.manifest.preprocess.size
    n, classes = spec.count, len(package.manifest.labels)
    if images.dtype != np.uint8 or images.shape != (n, h, w, 3):
        raise PackageError(f"{path}: images are {images.dtype} {images.shape}, expected uint8 {(n, h, w, 3)}")
    if reference.shape != (n, classes) or not np.isfinite(reference).all():
        raise PackageError(f"{path}: probabilities are {reference.shape}, expected finite {(n, classes)}")
    return CheckInputs(images=images, reference=reference.astype(np.float32), floor=spec.floor)


def measure_agreement(
    package: ModelPackage,
    artifact: str,
    check: CheckInputs,
    *,
    backend: Backend | None = None,
    options: BackendOptions | None = None,
) -> AgreementResult:
    """Run ``artifact`` on every check input and compare with the fp32 reference."""
    m = package.manifest
    b = backend or load_backend(package, artifact, options)
    try:
        pre = Preprocessor(m.preprocess, m.artifacts[artifact].input)
        probs = np.stack(
            [
                to_probabilities(b.run(pre.to_tensor(img)), m.output_kind, m.temperature)[0]
                for img in check.images
            ]
        )
    finally:
        if backend is None:
            b.close()
    if not np.isfinite(probs).all():
        return AgreementResult(artifact, 0.0, 1.0, len(probs), check.floor)
    agree = float(np.mean(probs.argmax(1) == check.reference.argmax(1)))
    distance = float(np.mean(0.5 * np.abs(probs - check.reference).sum(1)))
    return AgreementResult(artifact, agree, distance, len(probs), check.floor)
