"""Warm-started coresets (patchcore/coreset_memory.py): real builds on sample images, a real cache dir."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from inspection_refresh.patchcore.coreset_memory import TAU_RELATIVE_TOLERANCE
from inspection_refresh.manifests import file_sha256 as file_key

from .test_patchcore_feature_cache import EXACT, bank, build, entries

BUILD_LOG = "inspection_refresh.patchcore.build"


def picks_file(cache: Path) -> Path:
    (found,) = cache.glob("*/selections/*.json")
    return found


def cached_rows(cache: Path) -> dict[str, np.ndarray]:
    """Every cached image's features, by the image's sha256 (header skipped: magic, digest, rows, dim, CRC)."""
    return {path.stem: np.fromfile(path, dtype=np.float32, offset=52).reshape(-1, 1536) for path in entries(cache)}


def covering_radius(points: np.ndarray, centers: np.ndarray) -> float:
    d2 = (points**2).sum(1)[:, None] + (centers**2).sum(1)[None, :] - 2 * points @ centers.T
    return float(np.sqrt(max(0.0, d2.min(axis=1).max())))


def test_a_warm_started_rebuild_is_as_good_as_a_build_from_scratch(make_product, tmp_path, fast, caplog) -> None:
    # A denser coreset than the default: on 13 tiny images the default's held-out AUROC (3 held out x 4
    # defects) swings between 0.75 and 1.0 with any change of the greedy, even a from-scratch one.
    fast = {**fast, "coreset": 0.25}
    ok, defect = make_product(tmp_path / "P", 6, normals=14, defects=4)
    later = tmp_path / "later"
    later.mkdir()
    for name in ("normal_005.jpg", "normal_011.jpg"):
        shutil.move(ok / name, later / name)
    cache = tmp_path / "cache"
    build(ok, tmp_path / "first", fast, defect, feature_cache=str(cache))
    for path in later.iterdir():
        shutil.move(path, ok / path.name)
    (ok / "normal_002.jpg").unlink()

    with caplog.at_level(logging.INFO, logger=BUILD_LOG):
        again = build(ok, tmp_path / "again", fast, defect, feature_cache=str(cache))
    scratch = build(ok, tmp_path / "scratch", fast, defect)

    assert "[P] coreset (calibration): warm start from" in caplog.text
    assert "[P] coreset (bank): warm start from" in caplog.text
    # Equally good: same rows count, same held-out AUROC, tau within the stated tolerance.
    assert again["bank_size"] == scratch["bank_size"] and again["auroc"] == scratch["auroc"]
    for key in ("pixel", "image"):
        assert again["tau"][key] == pytest.approx(scratch["tau"][key], rel=TAU_RELATIVE_TOLERANCE)
    # Real patches of the current images, covering them about as well as the greedy from scratch.
    current = {file_key(path) for path in ok.iterdir()}
    patches = np.concatenate([rows for key, rows in cached_rows(cache).items() if key in current])
    known = {row.tobytes() for row in patches}
    assert all(row.tobytes() in known for row in bank(again))
    assert covering_radius(patches, bank(again)) <= 1.15 * covering_radius(patches, bank(scratch))


def test_picks_of_removed_images_are_dropped(make_product, tmp_path, fast, caplog) -> None:
    ok, _ = make_product(tmp_path / "P", 7, normals=10)
    cache = tmp_path / "cache"
    build(ok, tmp_path / "first", fast, feature_cache=str(cache))
    before = json.loads(picks_file(cache).read_text())["picks"]
    shas = {file_key(path): path for path in ok.iterdir()}
    removed = before["bank"][0][0]  # an image the published bank took a patch from
    removed_rows = cached_rows(cache)[removed]
    shas[removed].unlink()

    with caplog.at_level(logging.INFO, logger=BUILD_LOG):
        again = build(ok, tmp_path / "again", fast, feature_cache=str(cache))

    after = json.loads(picks_file(cache).read_text())["picks"]
    gone = sum(key == removed for key, _ in before["bank"])
    assert f"coreset (bank): warm start from {len(before['bank']) - gone} of the previous build's " \
           f"{len(before['bank'])} picks" in caplog.text
    assert removed not in {key for picks in after.values() for key, _ in picks}
    assert not {row.tobytes() for row in removed_rows} & {row.tobytes() for row in bank(again)}
    assert again["num_images"] == 9


def test_a_rebuild_with_no_change_reuses_every_pick(product_dirs, tmp_path, fast, caplog) -> None:
    ok, defect = product_dirs
    cache = str(tmp_path / "cache")
    first = build(ok, tmp_path / "first", fast, defect, feature_cache=cache)
    with caplog.at_level(logging.INFO, logger=BUILD_LOG):
        again = build(ok, tmp_path / "again", fast, defect, feature_cache=cache)

    picks = json.loads(picks_file(Path(cache)).read_text())["picks"]
    for coreset in ("calibration", "bank"):
        count = len(picks[coreset])
        assert f"coreset ({coreset}): warm start from {count} of the previous build's {count} picks" in caplog.text
    assert np.array_equal(bank(first), bank(again)) and first["tau"] == again["tau"]


@pytest.mark.parametrize("damage", ["lost", "corrupt", "foreign"])
def test_a_lost_or_unusable_picks_file_falls_back_to_the_full_greedy(make_product, tmp_path, fast, caplog,
                                                                     damage) -> None:
    ok, _ = make_product(tmp_path / "P", 8, normals=9)
    later = tmp_path / "later"
    later.mkdir()
    shutil.move(ok / "normal_004.jpg", later / "normal_004.jpg")
    cache = tmp_path / "cache"
    build(ok, tmp_path / "first", fast, feature_cache=str(cache), **EXACT)
    shutil.move(later / "normal_004.jpg", ok / "normal_004.jpg")
    picks = picks_file(cache)
    if damage == "lost":
        picks.unlink()
    else:
        picks.write_text("{not json" if damage == "corrupt" else json.dumps({"format": 99, "picks": {}}))

    with caplog.at_level(logging.INFO, logger=BUILD_LOG):
        again = build(ok, tmp_path / "again", fast, feature_cache=str(cache), **EXACT)
    scratch = build(ok, tmp_path / "scratch", fast, **EXACT)

    assert "warm start" not in caplog.text
    expected = {"lost": "no previous coreset picks", "corrupt": "ignoring unreadable coreset picks",
                "foreign": "not a coreset-picks file of this version"}[damage]
    assert expected in caplog.text
    assert np.array_equal(bank(again), bank(scratch)) and again["tau"] == scratch["tau"]
    assert json.loads(picks_file(cache).read_text())["format"] == 1  # rewritten for the next build
