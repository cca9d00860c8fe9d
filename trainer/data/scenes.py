"""Rendered camera scenes for the built-in dataset: objects on a conveyor or shelf, in named domains.

A scene is one object of a class (circle, ellipse, triangle, square, rectangle, pentagon, hexagon,
star) with random colour, size, rotation, position and shading, over a background, under a lighting,
seen through a sensor. Each of the three is a named *domain* value, so a shift can be scheduled by
name (the fleet simulator renders frames with :func:`render_frame`)::

    rng = np.random.default_rng(7)
    frame = render_frame("star", Domain(lighting="night"), rng, size=(640, 480))   # BGR uint8

The training domains (:data:`BASE_DOMAINS`) are day/dusk lighting over belt/shelf/plain backgrounds
with a clean sensor; every other value (night, glare, clutter, tiles, noisy, soft, lowres) is a shift
that the base model has never seen. Pure numpy/OpenCV, deterministic for a generator state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import cv2
import numpy as np

CLASSES: tuple[str, ...] = (
    "circle",
    "ellipse",
    "triangle",
    "square",
    "rectangle",
    "pentagon",
    "hexagon",
    "star",
)
LIGHTINGS: tuple[str, ...] = ("day", "dusk", "night", "glare")
BACKGROUNDS: tuple[str, ...] = ("belt", "shelf", "plain", "clutter", "tiles")
SENSORS: tuple[str, ...] = ("clean", "noisy", "soft", "lowres")


@dataclass(frozen=True)
class Domain:
    """Where and how a scene is seen: one named value per factor."""

    lighting: str = "day"
    background: str = "belt"
    sensor: str = "clean"

    def __post_init__(self) -> None:
        for value, known, what in (
            (self.lighting, LIGHTINGS, "lighting"),
            (self.background, BACKGROUNDS, "background"),
            (self.sensor, SENSORS, "sensor"),
        ):
            if value not in known:
                raise ValueError(f"unknown {what} {value!r} (known: {', '.join(known)})")

    @property
    def name(self) -> str:
        return f"{self.lighting}/{self.background}/{self.sensor}"

    def as_meta(self) -> dict[str, str]:
        """Metadata keys for slicing evaluation (lighting, background, sensor, domain)."""
        return {
            "lighting": self.lighting,
            "background": self.background,
            "sensor": self.sensor,
            "domain": self.name,
        }


BASE_DOMAINS: tuple[Domain, ...] = tuple(
    Domain(lighting=li, background=b, sensor="clean")
    for li, b in itertools.product(("day", "dusk"), ("belt", "shelf", "plain"))
)
"""The domains the built-in dataset trains on; everything else is a shift."""


# -- backgrounds ----------------------------------------------------------------------------------
def _smooth_noise(h: int, w: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upscaled bicubically."""
    g = rng.uniform(-1, 1, (cells, max(2, cells * w // h))).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def _background(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Float32 BGR background in 0..1."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "belt":  # dark rubber conveyor with slats
        base = rng.uniform(0.18, 0.32)
        period = rng.uniform(18, 40)
        slats = (np.sin((yy + rng.uniform(0, period)) * 2 * np.pi / period) > 0.7).astype(np.float32)
        g = base + 0.06 * slats + 0.03 * _smooth_noise(h, w, rng, 6)
        tint = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.05, 0.05, 3)
        return g[..., None] * tint[None, None, :].astype(np.float32)
    if kind == "shelf":  # wooden planks with grain
        wood = np.array([0.25, 0.42, 0.62]) * rng.uniform(0.75, 1.15)  # BGR brown
        grain = 0.08 * np.sin(
            xx * rng.uniform(0.05, 0.12) + 3 * _smooth_noise(h, w, rng, 4)
        ) + 0.05 * _smooth_noise(h, w, rng, 12)
        plank = rng.uniform(50, 90)
        seams = (np.abs(((yy + rng.uniform(0, plank)) % plank) - plank / 2) > plank / 2 - 2).astype(
            np.float32
        )
        g = 1.0 + grain - 0.35 * seams
        return (g[..., None] * wood[None, None, :]).astype(np.float32)
    if kind == "plain":  # smooth gradient between two muted colours
        a, b = rng.uniform(0.35, 0.8, 3), rng.uniform(0.35, 0.8, 3)
        t = xx / w * rng.uniform(-1, 1) + yy / h * rng.uniform(-1, 1)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        return (a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]).astype(np.float32)
    if kind == "clutter":  # many small coloured things: a busy new environment
        img = np.ones((h, w, 3), np.float32) * rng.uniform(0.3, 0.7, 3).astype(np.float32)
        for _ in range(int(rng.integers(25, 45))):
            colour = tuple(float(c) for c in rng.uniform(0, 1, 3))
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            s = int(rng.integers(4, max(5, h // 9)))
            if rng.random() < 0.5:
                cv2.rectangle(img, (x - s, y - s // 2), (x + s, y + s // 2), colour, -1)
            else:
                cv2.line(
                    img,
                    (x, y),
                    (x + int(rng.integers(-3 * s, 3 * s)), y + int(rng.integers(-3 * s, 3 * s))),
                    colour,
                    2,
                )
        return img
    if kind == "tiles":  # checkerboard floor tiles
        size = rng.uniform(20, 45)
        a, b = rng.uniform(0.2, 0.9, 3), rng.uniform(0.2, 0.9, 3)
        chk = ((np.floor(xx / size) + np.floor(yy / size)) % 2).astype(np.float32)
        return (a[None, None, :] * (1 - chk[..., None]) + b[None, None, :] * chk[..., None]).astype(
            np.float32
        )
    raise ValueError(f"unknown background {kind!r}")


# -- objects --------------------------------------------------------------------------------------
def _regular(n: int, r: float, phase: float) -> np.ndarray:
    a = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _outline(cls: str, r: float, rng: np.random.Generator) -> np.ndarray:
    """Polygon (N x 2, centred at 0) of one object of class ``cls`` with circumradius about ``r``."""
    if cls == "circle":
        return _regular(64, r, 0.0)
    if cls == "ellipse":
        p = _regular(64, r, 0.0)
        p[:, 1] *= rng.uniform(0.5, 0.72)
        return p
    if cls == "triangle":
        return _regular(3, r, rng.uniform(0, 2 * np.pi))
    if cls == "square":
        return _regular(4, r, np.pi / 4)
    if cls == "rectangle":
        p = _regular(4, r, np.pi / 4)
        p[:, 1] *= rng.uniform(0.45, 0.7)
        return p
    if cls == "pentagon":
        return _regular(5, r, 0.0)
    if cls == "hexagon":
        return _regular(6, r, 0.0)
    if cls == "star":
        outer = _regular(5, r, 0.0)
        inner = _regular(5, r * rng.uniform(0.4, 0.55), np.pi / 5)
        return np.stack([outer, inner], 1).reshape(-1, 2)
    raise ValueError(f"unknown class {cls!r} (known: {', '.join(CLASSES)})")


def _rotate(p: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return p @ np.array([[c, s], [-s, c]])


def _draw_object(img: np.ndarray, cls: str, rng: np.random.Generator) -> None:
    """Paint one shaded object with a soft shadow into the float image, inside the centre square."""
    h, w = img.shape[:2]
    side = min(h, w)
    r = side * rng.uniform(0.13, 0.3)
    cx = w / 2 + rng.uniform(-1, 1) * (side / 2 - r) * 0.9
    cy = h / 2 + rng.uniform(-1, 1) * (side / 2 - r) * 0.9
    poly = _rotate(_outline(cls, r, rng), rng.uniform(0, 2 * np.pi)) + np.array([cx, cy])
    pts = np.round(poly * 16).astype(np.int32)  # 4 fractional bits for anti-aliasing
    # shadow: a blurred, offset dark copy
    shadow = np.zeros((h, w), np.float32)
    off = np.round(np.array([rng.uniform(2, 8), rng.uniform(2, 8)]) * side / 240 * 16).astype(np.int32)
    cv2.fillPoly(shadow, [pts + off], 1.0, cv2.LINE_AA, shift=4)
    shadow = np.asarray(cv2.GaussianBlur(shadow, (0, 0), side / 80), np.float32)
    img *= 1 - np.float32(0.45) * shadow[..., None]
    # body: colour with a linear shading gradient
    hsv = np.array([[[rng.integers(0, 180), rng.integers(90, 256), rng.integers(140, 256)]]], np.uint8)
    colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32) / 255
    mask = np.zeros((h, w), np.float32)
    cv2.fillPoly(mask, [pts], 1.0, cv2.LINE_AA, shift=4)
    x0, y0 = (int(max(0, v)) for v in poly.min(0) - 2)
    x1, y1 = int(min(w, poly[:, 0].max() + 3)), int(min(h, poly[:, 1].max() + 3))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    shade = 1 + 0.25 * (((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)) / r)
    body = np.clip(colour[None, None, :] * shade[..., None], 0, 1)
    m = mask[y0:y1, x0:x1, None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - m) + body * m
    edge = tuple(float(c) for c in colour * 0.45)
    cv2.polylines(img, [pts], True, edge, max(1, int(round(side / 160))), cv2.LINE_AA, shift=4)


def _distractors(img: np.ndarray, rng: np.random.Generator) -> None:
    """A few small price tags and scratches that are not objects of any class."""
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(0, 4))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        colour = tuple(float(c) for c in rng.uniform(0.5, 1.0, 3))
        if rng.random() < 0.5:
            cv2.rectangle(
                img, (x, y), (x + int(rng.integers(8, 22)), y + int(rng.integers(4, 9))), colour, -1
            )
        else:
            cv2.line(
                img,
                (x, y),
                (x + int(rng.integers(-30, 30)), y + int(rng.integers(-6, 6))),
                colour,
                1,
                cv2.LINE_AA,
            )


# -- lighting and sensor --------------------------------------------------------------------------
def _light(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    if kind == "day":
        gain = rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.04, 0.04, 3))
        return img * gain.astype(np.float32)
    if kind == "dusk":  # dimmer, warm
        gain = rng.uniform(0.55, 0.75) * np.array([0.8, 0.95, 1.15]) * (1 + rng.uniform(-0.04, 0.04, 3))
        return img * gain.astype(np.float32)
    if kind == "night":  # very dark and bluish; the sensor's gain amplifies its noise (chroma noise too)
        gain = rng.uniform(0.07, 0.14) * np.array([1.3, 1.0, 0.75])
        out = img * gain.astype(np.float32)
        luma = rng.normal(0, 0.03, (h, w, 1))
        return out + (luma + rng.normal(0, 0.02, out.shape)).astype(np.float32)
    if kind == "glare":  # over-exposed, with a large blown-out hot spot that washes colours out
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        cx, cy, s = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.35, 0.6) * min(h, w)
        spot = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))[..., None]
        out = img * rng.uniform(1.25, 1.5) + 0.6 * spot
        return out * (1 - 0.5 * spot) + 0.5 * spot * out.mean(
            axis=2, keepdims=True
        )  # desaturated where it glares
    raise ValueError(f"unknown lighting {kind!r}")


def _sensor(img8: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    h, w = img8.shape[:2]
    if kind == "clean":
        return img8
    if kind == "noisy":
        return np.clip(img8 + rng.normal(0, 16, img8.shape), 0, 255).astype(np.uint8)
    if kind == "soft":
        return cv2.GaussianBlur(img8, (0, 0), min(h, w) / 100)
    if kind == "lowres":
        small = cv2.resize(img8, (max(8, w // 4), max(8, h // 4)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    raise ValueError(f"unknown sensor {kind!r}")


def render_frame(
    label: str | int, domain: Domain, rng: np.random.Generator, size: tuple[int, int] = (320, 240)
) -> np.ndarray:
    """One camera frame (BGR uint8, ``size`` = (width, height)) showing an object of ``label``."""
    cls = CLASSES[label] if isinstance(label, int) else label
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r} (known: {', '.join(CLASSES)})")
    w, h = size
    img = _background(domain.background, h, w, rng)
    _distractors(img, rng)
    _draw_object(img, cls, rng)
    img = _light(img, domain.lighting, rng)
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(1.5)  # mild read noise
    img8 = np.clip(img * np.float32(255) + noise, 0, 255).astype(np.uint8)
    return _sensor(img8, domain.sensor, rng)
