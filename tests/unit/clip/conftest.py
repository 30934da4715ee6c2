"""Shared fixtures for the CLIP library tests.

The random ViT-B-32 checkpoint (~600 MB, a few seconds) comes from the
session-wide ``clip_checkpoint`` fixture in ``tests/conftest.py``; the model is
loaded once per session here; images are few and small.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def clip_model(clip_checkpoint):
    from inspection_refresh.clip.embed import load_model

    return load_model("ViT-B-32", str(clip_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """Five small JPEGs plus a PNG with alpha, a grayscale PNG and a palette PNG."""
    from inspection_refresh.clip.synthetic import synthetic_image, write_synthetic_jpegs

    d = tmp_path_factory.mktemp("clip_images")
    write_synthetic_jpegs(d, 5, size=(320, 240), seed=7)
    synthetic_image(10, (300, 200), seed=7).convert("RGBA").save(d / "rgba.png")
    synthetic_image(11, (250, 260), seed=7).convert("L").save(d / "gray.png")
    synthetic_image(12, (400, 300), seed=7).convert("P").save(d / "palette.png")
    return d


@pytest.fixture(scope="session")
def image_paths(image_dir) -> list[Path]:
    return sorted(image_dir.iterdir())
