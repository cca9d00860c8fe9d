"""Where the pretrained package's int8 artifacts disagree with fp32: by fp32's own top-1 margin.

    python -m bench.int8_margins                      # bench/results/int8_margins.json and a table
    LD_PRELOAD=build/cpuid_mask.so python -m bench.int8_margins --out bench/results/int8_margins-avx2.json

EfficientNet-Lite0 has 1,000 classes, and many camera crops sit between two of them. This bench takes
the 256 check frames ``export-pretrained`` measures agreement on (same seeds), runs the package's fp32
and int8 artifacts on them, and splits agreement by the fp32 margin (top-1 minus top-2 probability). As
a yardstick for how fragile each frame's top-1 is, it also runs fp32 on the same frames with a change no
person would see (Gaussian noise of 1 grey level, seeded): the agreement fp32 keeps with itself then.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.accuracy_bench import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "int8_margins.json"
MARGIN_EDGES = (0.0, 0.05, 0.1, 0.2, 0.4, 1.01)


def check_frames(count: int = 256, seed: int = 0) -> list[np.ndarray]:
    """The frames ``export_pretrained`` checks agreement on (its defaults: 256, seed 0)."""
    from trainer.data.photos import camera_frames, load_photos
    from trainer.data.quant_frames import augmented_views

    photos = load_photos()
    half = count // 2
    return camera_frames(photos, half, seed + 1000) + augmented_views(
        camera_frames(photos, count - half, seed + 2000), count - half, seed + 2001
    )


def _probs(pkg: Any, key: str, frames: list[np.ndarray]) -> np.ndarray:
    """Softmax outputs of one artifact, frame by frame, through the agent's preprocessing."""
    from edge_agent.backends import BackendOptions, load_backend
    from edge_agent.postprocess import to_probabilities
    from edge_agent.preprocess import Preprocessor

    m = pkg.manifest
    backend = load_backend(pkg, key, BackendOptions(threads=2))
    pre = Preprocessor(m.preprocess, m.artifacts[key].input)
    out = np.stack(
        [to_probabilities(backend.run(pre(f)[0]), m.output_kind, m.temperature)[0] for f in frames]
    )
    backend.close()
    return out


def _noisy(frames: list[np.ndarray], seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(f + rng.normal(0, 1.0, f.shape), 0, 255).astype(np.uint8) for f in frames]


def _by_margin(ref: np.ndarray, other_top1: np.ndarray) -> list[dict[str, Any]]:
    """Agreement with ``ref``'s top-1 per bin of ``ref``'s top-1 minus top-2 probability."""
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin, agree = top2[:, 1] - top2[:, 0], ref.argmax(1) == other_top1
    rows = []
    for lo, hi in zip(MARGIN_EDGES[:-1], MARGIN_EDGES[1:], strict=True):
        sel = (margin >= lo) & (margin < hi)
        rows.append({"margin": [lo, min(hi, 1.0)], "frames": int(sel.sum()), "agree": int(agree[sel].sum())})
    return rows


def run(package: Path) -> dict[str, Any]:
    from edge_agent.package import load_package

    pkg = load_package(package)
    frames = check_frames()
    out: dict[str, Any] = {
        "cpu_flags": cpu_flags(),
        "package": str(package),
        "frames": len(frames),
        "runtimes": {},
    }
    for runtime in ("onnx", "tflite"):
        fp32_key, int8_key = f"{runtime}-fp32", f"{runtime}-int8"
        if fp32_key not in pkg.manifest.artifacts or int8_key not in pkg.manifest.artifacts:
            continue
        ref = _probs(pkg, fp32_key, frames)
        int8 = _probs(pkg, int8_key, frames).argmax(1)
        noisy = _probs(pkg, fp32_key, _noisy(frames)).argmax(1)
        out["runtimes"][runtime] = {
            "int8_agreement": float(np.mean(int8 == ref.argmax(1))),
            "fp32_with_1_grey_level_noise": float(np.mean(noisy == ref.argmax(1))),
            "int8_by_margin": _by_margin(ref, int8),
            "noisy_fp32_by_margin": _by_margin(ref, noisy),
        }
    return out


def _share(row: dict[str, Any]) -> str:
    return f"{row['agree'] / row['frames']:.1%}" if row["frames"] else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, default=ROOT / "build" / "models" / "lite0")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    from trainer.sim.demo_photos import ensure_package

    ensure_package(a.package)
    result = run(a.package)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"cpu: {', '.join(result['cpu_flags'])}; {result['frames']} check frames")
    for runtime, r in result["runtimes"].items():
        print(
            f"{runtime}: int8 agrees {r['int8_agreement']:.1%}; fp32 with 1 grey level of noise agrees "
            f"{r['fp32_with_1_grey_level_noise']:.1%}"
        )
        print(f"  {'fp32 margin':>12s} {'frames':>6s} {'int8':>7s} {'fp32+noise':>10s}")
        for a8, n in zip(r["int8_by_margin"], r["noisy_fp32_by_margin"], strict=True):
            lo, hi = a8["margin"]
            print(f"  {lo:5.2f}-{hi:4.2f}   {a8['frames']:6d} {_share(a8):>7s} {_share(n):>10s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
