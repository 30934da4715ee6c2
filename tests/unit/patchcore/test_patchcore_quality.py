"""Suspected defects among the normal images (:mod:`inspection_refresh.patchcore.quality`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from inspection_refresh.dev.samples import DEFECT_TYPES, render_defect
from inspection_refresh.patchcore.bank import validate_bank
from inspection_refresh.patchcore.options import BuildOptions
from inspection_refresh.patchcore.images import list_images, probe
from inspection_refresh.patchcore.product import _split, build_product
from inspection_refresh.patchcore.quality import (
    QUALITY_FILE, leave_one_image_out_distances, left_out_scale, quality_record, robust_bar, scores_by_source)
from inspection_refresh.patchcore.reservoir import PatchReservoir

# Big enough for the sample generator's defects to survive the resize (a 96-pixel short side blurs them away),
# small enough for a build of ~20 images in seconds with random weights.
SIZE, SHORTER = (320, 256), 192
# Defect photos under normal-looking names, sorted among the clean ones; the seeded split puts them in the
# calibration-bank set (asserted below). A defect among the held-out images raises tau itself (quality.py).
PLANTED = ("normal_004a.jpg", "normal_011a.jpg", "normal_016a.jpg")


def _build(root: Path, make_product, normals: int, planted: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    ok, _ = make_product(root, 1, normals=normals, size=SIZE)
    for number, name in enumerate(planted):  # defect photos saved under normal-looking names
        render_defect(1, 700 + number, DEFECT_TYPES[number % 3], SIZE).save(ok / name, quality=92)
    summary = build_product(ok, root / "bank", BuildOptions(weights="random", shorter=SHORTER))
    quality = json.loads((root / "bank" / QUALITY_FILE).read_text())
    config = json.loads((root / "bank" / "bank_config.json").read_text())
    return summary, quality, config


def test_planted_defects_are_flagged_above_every_clean_image(tmp_path: Path, make_product) -> None:
    summary, quality, config = _build(tmp_path / "P1", make_product, normals=18, planted=PLANTED)
    _, held_out = _split(probe(list_images(tmp_path / "P1" / "ok"), SHORTER), 0.2, 0)
    assert not set(PLANTED) & {info.path.name for info in held_out}

    flagged = [entry["file"] for entry in quality["suspected_defects"]]
    assert sorted(flagged[: len(PLANTED)]) == sorted(PLANTED), quality  # every planted one, ahead of any clean one
    scores = [entry["score"] for entry in quality["suspected_defects"]]
    assert scores == sorted(scores, reverse=True)
    assert all(entry["score"] > quality["tau"] for entry in quality["suspected_defects"])
    assert all(math.isclose(e["score_over_tau"], e["score"] / quality["tau"], rel_tol=1e-3)
               for e in quality["suspected_defects"])
    assert quality["images_scored"] == summary["num_images"] == 18 + len(PLANTED)
    assert quality["tau"] == summary["tau"]["image"]
    assert summary["suspected_defects"] == quality["suspected_defects"]
    assert config["quality"]["suspected"] == len(flagged)
    assert config["quality"]["images_scored"] == quality["images_scored"]
    assert config["quality"]["method"] == quality["method"]
    validate_bank(tmp_path / "P1" / "bank")  # the side file does not upset what the service loads


def test_clean_product_flags_few_and_only_just_above_tau(tmp_path: Path, make_product) -> None:
    summary, quality, _ = _build(tmp_path / "P1", make_product, normals=20)

    assert quality["images_scored"] == 20
    assert len(quality["suspected_defects"]) <= 2, quality
    assert all(entry["score_over_tau"] < 1.1 for entry in quality["suspected_defects"]), quality
    assert summary["suspected_defects"] == quality["suspected_defects"]


def test_leave_one_image_out_distance_skips_only_rows_of_the_same_image() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 8)).astype(np.float32)
    sources = np.repeat(np.arange(4), 10)
    bank_rows = np.array([0, 3, 12, 15, 21, 33, 39])
    bank_rows_sources = sources[bank_rows]

    got = leave_one_image_out_distances(features, sources, features[bank_rows], bank_rows_sources)

    for row in range(len(features)):
        others = features[bank_rows[bank_rows_sources != sources[row]]]
        want = np.sqrt(((others - features[row]) ** 2).sum(axis=1)).min()
        assert got[row] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert got[0] > 0  # row 0 is itself a bank row, but of its own image: not its neighbour


def test_an_image_with_only_its_own_bank_rows_is_not_scored() -> None:
    features = np.eye(4, dtype=np.float32)
    sources = np.array([0, 0, 1, 1])
    distances = leave_one_image_out_distances(features, sources, features[:2], sources[:2])
    assert np.isinf(distances[:2]).all() and np.isfinite(distances[2:]).all()
    scores = scores_by_source(distances, sources, 3)
    assert math.isnan(scores[0]) and math.isfinite(scores[1]) and math.isnan(scores[2])  # 2: no rows held


def test_reservoir_keeps_each_rows_image_through_sampling() -> None:
    reservoir = PatchReservoir(capacity=50, dim=3, seed=1)
    for image in range(10):
        reservoir.add(np.full((20, 3), image, dtype=np.float32), source=image)
    assert reservoir.sampled and reservoir.size == 50
    np.testing.assert_array_equal(reservoir.features[:, 0].astype(np.int32), reservoir.sources)
    assert len(set(reservoir.sources.tolist())) > 5  # a uniform sample keeps rows of most images


def test_quality_record_scales_left_out_scores_and_lists_only_images_above_tau_and_the_bar() -> None:
    held = {f"h{i}.png": 1.0 + i / 100 for i in range(8)}  # tau (their 99.5th percentile) is just below h7
    left = {f"c{i}.png": 1.1 + i / 200 for i in range(10)} | {"bad.png": 2.2}
    tau = float(np.percentile(list(held.values()), 99.5))

    record = quality_record(left, held, tau, seconds=0.5)

    scale = left_out_scale(list(left.values()), list(held.values()))
    assert scale == pytest.approx(1.035 / 1.125)
    assert [entry["file"] for entry in record["suspected_defects"]] == ["bad.png"]
    assert record["suspected_defects"][0]["score"] == pytest.approx(2.2 * scale, rel=1e-5)
    assert record["suspected_defects"][0]["raw_score"] == pytest.approx(2.2)
    assert record["images_scored"] == 19 and record["left_out_scale"] == pytest.approx(scale, abs=1e-4)
    assert record["robust_bar"] == pytest.approx(robust_bar([*(v * scale for v in left.values()), *held.values()],
                                                           99.5), abs=1e-6)
    # h7 is above tau by construction (tau is the held-out scores' 99.5th percentile), not above the bar.
    assert held["h7.png"] > tau and quality_record({}, held, tau, 0.0)["suspected_defects"] == []
    assert [e["file"] for e in quality_record({}, held | {"h8.png": 1.5}, tau, 0.0)["suspected_defects"]] == [
        "h8.png"]
    assert left_out_scale([0.5, 0.5, 0.5], [1.0, 1.0, 1.0]) == 1.0  # never scaled up
