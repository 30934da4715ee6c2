"""Scoring, tau, AUROC and the reservoir; and the end-to-end AUROC floor on synthetic defects."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from inspection_refresh.patchcore.build import build_product
from inspection_refresh.patchcore.calibration import NearestNeighbourScorer, auroc, calibrate_tau, image_score
from inspection_refresh.patchcore.options import BuildOptions
from inspection_refresh.patchcore.reservoir import PatchReservoir


def test_auroc_rank_statistic() -> None:
    assert auroc([1, 2, 3], [4, 5]) == 1.0
    assert auroc([4, 5], [1, 2, 3]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5  # ties count half
    assert auroc([0.1, 0.4, 0.35, 0.8], [0.3, 0.9]) == pytest.approx(5 / 8)
    # Against the definition: P(defect > normal) + 0.5 P(equal), by brute force.
    rng = np.random.default_rng(0)
    normal, defect = rng.integers(0, 20, 50).astype(float), rng.integers(5, 25, 40).astype(float)
    pairs = (defect[:, None] > normal[None]).mean() + 0.5 * (defect[:, None] == normal[None]).mean()
    assert auroc(normal, defect) == pytest.approx(pairs)
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_scorer_matches_exact_distances() -> None:
    rng = np.random.default_rng(1)
    bank, queries = rng.standard_normal((200, 32)).astype(np.float32), rng.standard_normal((50, 32)).astype(np.float32)
    exact = np.sqrt(((queries[:, None] - bank[None]) ** 2).sum(-1)).min(axis=1)
    assert np.allclose(NearestNeighbourScorer(bank).distances(queries), exact, atol=1e-4)
    assert isinstance(NearestNeighbourScorer(bank).index, faiss.IndexFlatL2)


def test_tau_percentiles() -> None:
    held_out = [np.linspace(0, 1, 101), np.linspace(1, 2, 101)]
    tau = calibrate_tau(held_out, pixel_pct=50.0, image_pct=100.0)
    assert tau["pixel"] == pytest.approx(1.0)
    assert tau["image"] == pytest.approx(image_score(held_out[1])) == pytest.approx(1.99)


def test_reservoir_is_bounded_uniform_and_deterministic() -> None:
    rows = np.arange(10_000, dtype=np.float32)[:, None].repeat(2, axis=1)
    reservoir = PatchReservoir(capacity=1000, dim=2, seed=0, expected=10_000)
    for start in range(0, 10_000, 300):  # uneven batches across the fill boundary
        reservoir.add(rows[start : start + 300])
    kept = reservoir.features[:, 0]
    assert reservoir.size == 1000 and reservoir.seen == 10_000 and reservoir.sampled
    assert len(np.unique(kept)) == 1000
    # Uniform over the stream: each tenth of it holds about 100 of the kept rows.
    counts = np.bincount((kept // 1000).astype(int), minlength=10)
    assert counts.min() > 60 and counts.max() < 140
    again = PatchReservoir(capacity=1000, dim=2, seed=0)
    for start in range(0, 10_000, 300):
        again.add(rows[start : start + 300])
    assert np.array_equal(again.features, reservoir.features)

    small = PatchReservoir(capacity=50, dim=2)
    small.add(rows[:20])
    assert small.size == 20 and not small.sampled and np.array_equal(small.features, rows[:20])


# Measured (random-init ResNet50; 20 normal 256 px images per product, 5 held out; 6 defects, 2 of each
# type; shorter 256): this exact configuration gives AUROC [1.00, 1.00, 0.80, 1.00] for brushed metal,
# woven grid, perforated sheet and wood grain (mean 0.95). Over 8 other image/split seeds the 32
# per-product values ranged 0.77-1.00 and the per-run means 0.94-0.98. Random-init conv features see
# holes and lines well but some stains less so, and 5-vs-6 samples move AUROC in steps of 1/30.
# Floors with margin (chance is 0.5): every product >= 0.70, mean >= 0.88.
AUROC_FLOOR_EACH = 0.70
AUROC_FLOOR_MEAN = 0.88


@pytest.mark.slow
def test_held_out_defects_score_above_normals(tmp_path: Path, make_product) -> None:  # noqa: ANN001
    results = []
    for product in range(4):
        ok, defect = make_product(tmp_path / f"P{product}", product, normals=20, defects=6, size=(256, 256))
        summary = build_product(ok, tmp_path / f"P{product}" / "bank",
                                BuildOptions(weights="random", shorter=256, holdout=0.25), [defect])
        assert summary["num_defect_images"] == 6
        results.append(summary["auroc"])
    assert min(results) >= AUROC_FLOOR_EACH, results
    assert float(np.mean(results)) >= AUROC_FLOOR_MEAN, results


def test_matmul_search_equals_faiss_up_to_rounding() -> None:
    from inspection_refresh.patchcore.calibration import NearestNeighbourScorer

    rng = np.random.default_rng(4)
    bank = rng.standard_normal((700, 96)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries = rng.standard_normal((300, 96)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    queries[:5] = bank[[3, 30, 300, 301, 699]]  # exact members: distance 0, clamped, never NaN

    faiss_distances = NearestNeighbourScorer(bank, "faiss").distances(queries)
    matmul_distances = NearestNeighbourScorer(bank, "matmul").distances(queries)

    assert float(np.abs(faiss_distances - matmul_distances).max()) <= 1e-5
    assert np.all(np.isfinite(matmul_distances)) and float(matmul_distances[:5].max()) <= 1e-3
