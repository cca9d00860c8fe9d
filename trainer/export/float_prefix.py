"""The float-prefix search both int8 exports share: keep the first convolutions in float until the int8
artifact agrees with its fp32 on :data:`AGREEMENT_TARGET` of the check frames on every kernel path
measured (this CPU's and, where it can be emulated, a CPU without VNNI: :mod:`trainer.export.kernel_paths`;
see docs/quantization.md)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FLOAT_PREFIX_SHARES = (0.0, 0.15, 0.3, 0.45)
"""Shares of the network's convolutions, from the input on, that the int8 exports may keep in float."""
AGREEMENT_TARGET = 0.97
"""Top-1 agreement with fp32 on the check frames an int8 artifact should reach."""


def search_float_prefix(
    out: Path, quantize: Callable[[Path, float], None], agrees: Callable[[Path], dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Quantize with growing float prefixes (:data:`FLOAT_PREFIX_SHARES`) until one reaches
    :data:`AGREEMENT_TARGET` on its worst kernel path; the best variant (by that worst path) ends up at
    ``out``. ``agrees`` gives, per kernel path, whether each check frame's top-1 equals fp32's. Returns
    model.json's record of it: the kept prefix, every variant's agreement per kernel path, the paths."""
    variants: dict[str, dict[str, float]] = {}
    best: tuple[float, float, Path] | None = None
    for share in FLOAT_PREFIX_SHARES:
        path = out.with_name(f"{out.stem}.f{int(share * 100)}{out.suffix}")
        quantize(path, share)
        by_path = {kernels: round(float(np.mean(hits)), 4) for kernels, hits in agrees(path).items()}
        agreement = min(by_path.values())
        variants[f"{share:.0%} float"] = by_path
        if best is None or agreement > best[0]:
            if best is not None:
                best[2].unlink()
            best = (agreement, share, path)
        else:
            path.unlink()
        if agreement >= AGREEMENT_TARGET:
            break
    assert best is not None
    os.replace(best[2], out)
    reached = best[0] >= AGREEMENT_TARGET
    return {
        "float_prefix": f"first {best[1]:.0%} of the convolutions kept in float",
        "chosen_because": (
            f"fewest float layers reaching {AGREEMENT_TARGET:.0%} on every kernel path"
            if reached
            else f"no variant reached {AGREEMENT_TARGET:.0%} on every kernel path; best worst-path agreement "
            f"{best[0]:.1%}"
        ),
        "variants": variants,
        "kernel_paths": sorted(next(iter(variants.values()))),
    }
