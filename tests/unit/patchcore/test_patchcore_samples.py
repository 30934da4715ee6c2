"""Synthetic demo images: deterministic, distinct per product, similar per seed, visible local defects."""

from __future__ import annotations

import time

import numpy as np
import pytest

from inspection_refresh.dev.samples import DEFECT_TYPES, render_defect, render_normal


def pixels(image) -> np.ndarray:  # noqa: ANN001
    return np.asarray(image, dtype=np.float32) / 255.0


def test_deterministic_sized_rgb() -> None:
    image = render_normal(2, 5, (320, 200))
    assert image.mode == "RGB" and image.size == (320, 200)
    assert np.array_equal(pixels(image), pixels(render_normal(2, 5, (320, 200))))
    for defect in DEFECT_TYPES:
        assert np.array_equal(pixels(render_defect(2, 5, defect, (320, 200))),
                              pixels(render_defect(2, 5, defect, (320, 200))))
    assert DEFECT_TYPES == ("scratch", "hole", "stain")


def test_products_differ_more_than_seeds_of_one_product() -> None:
    # Compare coarse appearance (mean colour and contrast): seeds vary it a little, products a lot.
    def signature(product: int, seed: int) -> np.ndarray:
        p = pixels(render_normal(product, seed, (200, 200)))
        return np.concatenate([p.mean(axis=(0, 1)), p.std(axis=(0, 1))])

    within = max(np.abs(signature(p, 0) - signature(p, 1)).max() for p in range(6))
    between = min(np.abs(signature(a, 0) - signature(b, 0)).max() for a in range(6) for b in range(a + 1, 6))
    assert within < between
    assert not np.array_equal(pixels(render_normal(0, 0, (64, 64))), pixels(render_normal(0, 1, (64, 64))))


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defects_are_local_and_visible(defect: str) -> None:
    for product in range(4):
        normal = pixels(render_normal(product, 9, (450, 450)))
        damaged = pixels(render_defect(product, 9, defect, (450, 450)))
        changed = np.abs(damaged - normal).max(axis=2) > 0.15
        assert 0.0005 < changed.mean() < 0.08, (product, defect, changed.mean())


def test_unknown_defect_and_fast_enough() -> None:
    with pytest.raises(ValueError, match="unknown defect 'dent'"):
        render_defect(0, 0, "dent")
    started = time.process_time()
    for product in range(4):
        render_normal(product, 0)
        render_defect(product, 0, DEFECT_TYPES[product % 3])
    per_image = (time.process_time() - started) / 8
    assert per_image < 0.2  # ~30 ms on an idle 2-core machine; generous for shared CI
