"""Synthetic product images for the demo, the tests and the benchmarks.

Each product has its own texture (brushed metal, woven grid, perforated sheet,
wood grain; product indices beyond four reuse them with another colour and scale).
Normal images of one product differ by a small shift, rotation, brightness
change and noise; defect images are a normal image with one injected defect
(``scratch``, ``hole`` or ``stain``). Everything is deterministic for
``(product_index, seed, defect)`` and vectorised with numpy (a 900x900 image
takes a few tens of milliseconds).

Sizes follow PIL: ``size=(width, height)``. Texture periods and defect sizes
scale with ``min(size) / 900`` so small test images look like shrunken demo images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DEFECT_TYPES = ("scratch", "hole", "stain")
TEXTURES = ("brushed_metal", "woven_grid", "perforated", "wood_grain")
_DEFECT_CODES = {name: i + 1 for i, name in enumerate(DEFECT_TYPES)}

# Base colours (RGB in [0, 1]) per texture; later product cycles tint them.
_BASE_COLOURS = (
    (0.62, 0.64, 0.68),
    (0.55, 0.50, 0.40),
    (0.58, 0.60, 0.58),
    (0.66, 0.48, 0.30),
)


def render_normal(product_index: int, seed: int, size: tuple[int, int] = (900, 900)) -> Image.Image:
    """A defect-free image of product ``product_index`` (any int >= 0), varied by ``seed``."""
    return Image.fromarray(_render(product_index, seed, size), "RGB")


def render_defect(
    product_index: int, seed: int, defect: str, size: tuple[int, int] = (900, 900)
) -> Image.Image:
    """The normal image for ``(product_index, seed)`` with one ``defect`` from ``DEFECT_TYPES`` injected."""
    if defect not in _DEFECT_CODES:
        raise ValueError(f"unknown defect {defect!r}; expected one of {', '.join(DEFECT_TYPES)}")
    rgb = _render(product_index, seed, size)
    rng = np.random.default_rng([product_index, seed, _DEFECT_CODES[defect]])
    scale = min(size) / 900.0
    {"scratch": _add_scratch, "hole": _add_hole, "stain": _add_stain}[defect](rgb, rng, scale)
    return Image.fromarray(rgb, "RGB")


_LEVELS = 1024
_SHADE_RANGE = (-2.5, 2.5)


def _render(product_index: int, seed: int, size: tuple[int, int]) -> np.ndarray:
    """``uint8 [H, W, 3]`` image: a luminance map per texture, coloured through a lookup table."""
    if product_index < 0:
        raise ValueError(f"product_index must be >= 0, got {product_index}")
    width, height = size
    texture = product_index % len(TEXTURES)
    cycle = product_index // len(TEXTURES)
    rng = np.random.default_rng([product_index, seed, 0])
    scale = min(size) / 900.0 * (1.0 + 0.25 * (cycle % 3))
    # Per-image pose: small rotation and shift, applied to the pixel coordinates.
    angle = np.deg2rad(rng.uniform(-2.0, 2.0))
    shift = rng.uniform(0, 200, size=2)
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    cos, sin = np.float32(np.cos(angle) / scale), np.float32(np.sin(angle) / scale)
    u = x * cos + y * sin + np.float32(shift[0])
    v = y * cos - x * sin + np.float32(shift[1])
    shade = _TEXTURE_FUNCS[texture](u, v, rng, (height, width))
    shade += (rng.random((height, width), dtype=np.float32) - np.float32(0.5)) * np.float32(0.16)
    # Colour lookup: shade level -> RGB, with this image's brightness.
    colour = np.array(_BASE_COLOURS[texture], dtype=np.float32)
    if cycle:  # later cycles: rotate and shift the colour so products stay distinct
        colour = np.roll(colour, cycle) * np.float32(0.9) + np.float32(0.05 * (cycle % 4))
    brightness = np.float32(rng.uniform(0.95, 1.05))
    low, high = _SHADE_RANGE
    levels = np.linspace(low, high, _LEVELS, dtype=np.float32)
    lut = _to_uint8(colour[None, :] * brightness * (1.0 + 0.35 * levels[:, None]))
    index = (shade - np.float32(low)) * np.float32((_LEVELS - 1) / (high - low))
    np.clip(index, 0, _LEVELS - 1, out=index)
    return lut[index.astype(np.int16)]


def _brushed_metal(u: np.ndarray, v: np.ndarray, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Fine streaks along ``u``: a random profile indexed by ``v``, plus slow waviness."""
    profile = rng.standard_normal(4096).astype(np.float32)
    profile = (profile + np.roll(profile, 1) + np.roll(profile, -1)) / 3.0
    rows = (v * 2.0).astype(np.int64) % profile.size
    return 0.8 * profile[rows] + 0.25 * np.sin(u / 90.0, dtype=np.float32)


def _woven_grid(u: np.ndarray, v: np.ndarray, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Basket weave: cells alternate horizontal and vertical threads, with dark gaps between cells."""
    period = np.float32(36.0)
    cu, cv = u / period, v / period
    iu, iv = np.floor(cu), np.floor(cv)
    cu -= iu  # position inside the cell, [0, 1)
    cv -= iv
    across = np.where((iu + iv).astype(np.int32) & 1, cv, cu)
    threads = np.cos(across * np.float32(2 * np.pi * 3))
    gap = (np.minimum(np.minimum(cu, 1 - cu), np.minimum(cv, 1 - cv)) < 0.04)
    threads *= np.float32(0.6)
    threads -= gap * np.float32(0.5)
    return threads


def _perforated(u: np.ndarray, v: np.ndarray, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A metal sheet with round holes (radius 11 px at 900 px) on a staggered lattice."""
    period = np.float32(48.0)
    cv = v / period
    row = np.floor(cv)
    cv -= row
    cv -= np.float32(0.5)
    cu = u / period
    cu += (row.astype(np.int32) & 1) * np.float32(0.5)
    cu -= np.floor(cu)
    cu -= np.float32(0.5)
    # Squared distance to the hole centre, in pixels^2; the edge is soft over ~2 px.
    cu *= cu
    cv *= cv
    cu += cv
    cu *= np.float32(-period * period / 44.0)
    cu += np.float32(121.0 / 44.0)  # (11^2 - d^2) / (4 * 11) ~ (11 - d) / 2 near the edge
    holes = np.clip(cu, 0.0, 1.0, out=cu)
    holes *= np.float32(-1.6)
    holes += np.float32(0.2) * np.sin(u / np.float32(60.0))
    return holes


def _wood_grain(u: np.ndarray, v: np.ndarray, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Growth rings along ``u`` bent by smooth low-frequency noise."""
    coarse = Image.fromarray(rng.uniform(-1, 1, size=(12, 12)).astype(np.float32), mode="F")
    warp = np.asarray(coarse.resize(shape[::-1], Image.BICUBIC), dtype=np.float32)
    phase = v / 14.0 + 2.5 * warp + 0.6 * np.sin(u / 120.0, dtype=np.float32)
    rings = np.sin(phase, dtype=np.float32)
    return 0.7 * np.sign(rings) * np.abs(rings) ** 0.5 + 0.2 * warp


_TEXTURE_FUNCS = (_brushed_metal, _woven_grid, _perforated, _wood_grain)


def _box(cx: float, cy: float, half: float, shape: tuple[int, ...]) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Row/column slices of a square around ``(cx, cy)`` clipped to the image, and its pixel coordinates."""
    height, width = shape[:2]
    top, left = int(max(0, cy - half)), int(max(0, cx - half))
    bottom, right = int(min(height, cy + half + 1)), int(min(width, cx + half + 1))
    y = np.arange(top, bottom, dtype=np.float32)[:, None]
    x = np.arange(left, right, dtype=np.float32)[None, :]
    return slice(top, bottom), slice(left, right), y, x


def _blend(img: np.ndarray, rows: slice, cols: slice, alpha: np.ndarray, target: np.ndarray,
           darken: np.ndarray | float = 0.0) -> None:
    """In place: ``patch * (1 - darken)``, then move it towards ``target`` by ``alpha`` (all in [0, 1])."""
    patch = img[rows, cols].astype(np.float32) / np.float32(255.0)
    if np.ndim(darken):
        patch *= 1.0 - darken[..., None]
    patch += alpha[..., None] * (target - patch)
    img[rows, cols] = _to_uint8(patch)


def _add_scratch(img: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """A thin straight bright or dark line, 200-450 px long and 4-7 px wide at 900 px."""
    height, width = img.shape[:2]
    length = rng.uniform(200, 450) * scale
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
    x0, y0, sx, sy = cx - dx, cy - dy, 2 * dx, 2 * dy
    half_width = max(1.2, rng.uniform(2.0, 3.5) * scale)
    rows, cols, y, x = _box(cx, cy, length / 2 + 2 * half_width + 1, img.shape)
    # Distance from each pixel to the segment from (x0, y0) along (sx, sy).
    t = np.clip(((x - x0) * sx + (y - y0) * sy) / (sx * sx + sy * sy), 0.0, 1.0)
    dist = np.hypot(x - (x0 + t * sx), y - (y0 + t * sy))
    alpha = np.clip(half_width + 0.5 - dist, 0.0, 1.0)
    target = np.float32(0.97 if rng.random() < 0.5 else 0.08)
    _blend(img, rows, cols, alpha, target)


def _add_hole(img: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """A dark round hole, radius 20-40 px at 900 px, with a faint shadow ring."""
    height, width = img.shape[:2]
    radius = rng.uniform(20, 40) * scale
    cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
    rows, cols, y, x = _box(cx, cy, 2 * radius + 2, img.shape)
    dist = np.hypot(x - cx, y - cy)
    inside = np.clip(radius + 0.5 - dist, 0.0, 1.0)
    shadow = np.clip(1.0 - np.abs(dist - radius) / (0.35 * radius + 1), 0.0, 1.0) * 0.35
    _blend(img, rows, cols, inside, np.float32(0.04), darken=shadow)


def _add_stain(img: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """A blotchy tinted stain, 50-100 px radius at 900 px, with an irregular outline."""
    height, width = img.shape[:2]
    radius = rng.uniform(50, 100) * scale
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    rows, cols, y, x = _box(cx, cy, 1.6 * radius + 2, img.shape)
    blotch = Image.fromarray(rng.uniform(0, 1, size=(7, 7)).astype(np.float32), mode="F")
    blotch = np.asarray(blotch.resize((x.shape[1], y.shape[0]), Image.BICUBIC), dtype=np.float32)
    dist = np.hypot(x - cx, y - cy) / radius + 0.6 * (blotch - 0.5)
    alpha = np.clip((1.0 - dist) * 4.0, 0.0, 1.0) * np.float32(rng.uniform(0.7, 0.9))
    # Oil, rust or ink: the candidate colour farthest from the surface underneath, so it shows.
    tints = np.array([(0.40, 0.22, 0.06), (0.16, 0.30, 0.12), (0.14, 0.12, 0.34)], dtype=np.float32)
    surface = img[rows, cols].reshape(-1, 3).mean(axis=0) / np.float32(255.0)
    tint = tints[int(np.argmax(((tints - surface) ** 2).sum(axis=1)))]
    _blend(img, rows, cols, alpha, tint)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
