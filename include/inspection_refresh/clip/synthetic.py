"""Synthetic inspection-like photos for tests, the demo and the benchmark.

No real images are available offline, so this makes JPEGs that cost what real
~1 MP photos cost to decode: smooth lighting gradients, a few solid shapes,
fine texture and mild sensor noise (pure noise or flat colour would compress and
decode unrealistically). Each image depends only on ``(seed, index)``.
"""

from __future__ import annotations

from pathlib import Path


def synthetic_image(index: int, size: tuple[int, int] = (1200, 900), seed: int = 0):
    """One RGB ``PIL.Image`` of ``size`` (width, height), deterministic for (seed, index)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 200, size=3).astype(np.float32)
    gx, gy = rng.uniform(-60, 60, size=(2, 3)).astype(np.float32)
    img = base + gx * (xx / w)[..., None] + gy * (yy / h)[..., None]
    # fine machined-surface texture
    freq = rng.uniform(0.05, 0.3)
    img += 6.0 * np.sin(freq * xx + 0.3 * yy)[..., None]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w - 50)), int(rng.integers(0, h - 50))
        x1, y1 = x0 + int(rng.integers(30, w // 3)), y0 + int(rng.integers(30, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
    for _ in range(int(rng.integers(0, 4))):  # scratches
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(pts, fill=(20, 20, 20), width=int(rng.integers(1, 4)))
    arr = np.asarray(pil).astype(np.int16)
    arr += rng.normal(0, 4.0, size=arr.shape).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_synthetic_jpegs(
    out_dir: str | Path,
    count: int,
    size: tuple[int, int] = (1200, 900),
    seed: int = 0,
    quality: int = 90,
    prefix: str = "img",
) -> list[Path]:
    """Write ``count`` JPEGs ``{prefix}_{i:05d}.jpg`` into ``out_dir``; existing files are kept.

    Returns the paths in index order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = out / f"{prefix}_{i:05d}.jpg"
        if not p.exists():
            tmp = p.with_name(p.name + ".tmp")
            synthetic_image(i, size, seed).save(tmp, format="JPEG", quality=quality)
            tmp.replace(p)
        paths.append(p)
    return paths
