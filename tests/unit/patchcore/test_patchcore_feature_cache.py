"""The per-image feature cache (patchcore/feature_cache.py): real builds on sample images, a real cache dir."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inspection_refresh.patchcore.feature_cache import FeatureCache, default_feature_cache_dir
from inspection_refresh.patchcore.options import BuildOptions
from inspection_refresh.patchcore.product import build_product

from .conftest import SCRIPT

EXACT = {"batch_size": 1}
"""One image per forward pass: a batched convolution rounds differently from a single one (~1e-7), so a
build that extracts only the new images batches them differently from a build from scratch; one at a
time, both extract every image alike and the banks must be equal bit for bit."""


def build(ok: Path, out: Path, fast: dict, defect: Path | None = None, **options) -> dict:
    return build_product(ok, out, BuildOptions(**fast, **options), [defect] if defect else [], product="P")


def bank(summary: dict) -> np.ndarray:
    return torch.load(Path(summary["out_dir"]) / "memory_bank.pt").numpy()


def same_bank(a: dict, b: dict) -> None:
    assert np.array_equal(bank(a), bank(b))
    assert a["tau"] == b["tau"] and a["auroc"] == b["auroc"] and a["bank_size"] == b["bank_size"]


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/*/*.f32"))


def forget_picks(cache: str) -> None:
    """Delete the coreset picks kept beside the cache (coreset_memory): the rebuild then runs the full greedy,
    so what these tests compare is the cached features alone (warm starts: test_patchcore_incremental.py)."""
    for selections in Path(cache).glob("*/selections"):
        shutil.rmtree(selections)


def test_a_rebuild_from_the_cache_equals_a_build_from_scratch(product_dirs, tmp_path, fast, caplog) -> None:
    ok, defect = product_dirs
    cache = str(tmp_path / "cache")
    scratch = build(ok, tmp_path / "scratch", fast, defect)
    cold = build(ok, tmp_path / "cold", fast, defect, feature_cache=cache)
    caplog.clear()  # the builds above may have been captured too (another test may have set the logger's level)
    with caplog.at_level(logging.INFO, logger="inspection_refresh.patchcore.build"):
        warm = build(ok, tmp_path / "warm", fast, defect, feature_cache=cache)

    assert scratch["feature_cache"] is None
    assert cold["feature_cache"]["hits"] == 0 and cold["feature_cache"]["extracted"] == 11  # 8 normal + 3 defect
    assert warm["feature_cache"]["hits"] == 11 and warm["feature_cache"]["extracted"] == 0
    same_bank(scratch, cold)
    same_bank(scratch, warm)
    assert "[P] features: 11 of 11 images from the cache, 0 extracted" in caplog.text
    assert "features (calibration bank)" not in caplog.text  # nothing was decoded or run through the network
    assert len(entries(Path(cache))) == 11


def test_new_and_removed_images_are_the_only_ones_extracted(make_product, tmp_path, fast, caplog) -> None:
    ok, _ = make_product(tmp_path / "P", 4, normals=10)
    cache = str(tmp_path / "cache")
    build(ok, tmp_path / "first", fast, feature_cache=cache, **EXACT)
    extra, _ = make_product(tmp_path / "more", 4, normals=12)  # seeds 10 and 11 are new images
    for name in ("normal_010.jpg", "normal_011.jpg"):
        shutil.copy(extra / name, ok / name)
    (ok / "normal_003.jpg").unlink()
    forget_picks(cache)

    with caplog.at_level(logging.INFO, logger="inspection_refresh.patchcore.build"):
        again = build(ok, tmp_path / "again", fast, feature_cache=cache, **EXACT)
    scratch = build(ok, tmp_path / "scratch", fast, **EXACT)

    assert again["num_images"] == 11
    assert again["feature_cache"]["hits"] == 9 and again["feature_cache"]["extracted"] == 2
    assert "[P] features: 9 of 11 images from the cache, 2 extracted" in caplog.text
    same_bank(again, scratch)


def test_with_batched_extraction_an_incremental_bank_is_equally_good(make_product, tmp_path, fast) -> None:
    """Default batching: the new images share forward passes with each other, not with their neighbours of a
    build from scratch, so features may differ in the last float bits; the bank must be as good."""
    ok, defect = make_product(tmp_path / "P", 5, normals=12, defects=3)
    held_back = tmp_path / "held_back"
    held_back.mkdir()
    for name in ("normal_004.jpg", "normal_009.jpg"):
        shutil.move(ok / name, held_back / name)
    cache = str(tmp_path / "cache")
    build(ok, tmp_path / "first", fast, defect, feature_cache=cache)
    for path in held_back.iterdir():
        shutil.move(path, ok / path.name)
    forget_picks(cache)

    again = build(ok, tmp_path / "again", fast, defect, feature_cache=cache)
    scratch = build(ok, tmp_path / "scratch", fast, defect)

    assert again["feature_cache"]["extracted"] == 2 and again["feature_cache"]["hits"] == 13
    assert again["bank_size"] == scratch["bank_size"] and again["auroc"] == scratch["auroc"]
    for key in ("pixel", "image"):
        assert again["tau"][key] == pytest.approx(scratch["tau"][key], rel=1e-4)
    assert np.abs(bank(again) - bank(scratch)).max() < 1e-3  # the same greedy picks, up to float rounding


def test_other_extraction_settings_miss(product_dirs, tmp_path, fast) -> None:
    ok, _ = product_dirs
    cache = tmp_path / "cache"
    build(ok, tmp_path / "stride2", fast, feature_cache=str(cache))
    stride1 = build(ok, tmp_path / "stride1", fast, feature_cache=str(cache), stride=1)
    layer3 = build(ok, tmp_path / "layer3", fast, feature_cache=str(cache), layers=["layer3"])

    assert stride1["feature_cache"]["hits"] == 0 and stride1["feature_cache"]["extracted"] == 8
    assert layer3["feature_cache"]["hits"] == 0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3  # one directory per extraction fingerprint


def test_a_corrupt_or_truncated_entry_is_extracted_again(product_dirs, tmp_path, fast, caplog) -> None:
    ok, _ = product_dirs
    cache = tmp_path / "cache"
    scratch = build(ok, tmp_path / "scratch", fast, **EXACT)
    build(ok, tmp_path / "first", fast, feature_cache=str(cache), **EXACT)
    flipped, cut, empty = entries(cache)[:3]
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-100])
    empty.write_bytes(b"")

    with caplog.at_level(logging.INFO, logger="inspection_refresh.patchcore.build"):
        again = build(ok, tmp_path / "again", fast, feature_cache=str(cache), **EXACT)

    assert again["feature_cache"]["corrupt"] == 3 and again["feature_cache"]["extracted"] == 3
    assert again["feature_cache"]["hits"] == 5
    same_bank(again, scratch)
    assert caplog.text.count("feature cache entry") == 1  # logged once per build, counted in the feature line
    assert "3 unusable entries re-extracted" in caplog.text
    assert FeatureCache(cache, _fingerprint_of(cache), 1536).load(flipped.stem) is not None  # stored anew


def _fingerprint_of(cache: Path) -> str:
    """The full fingerprint of the one fingerprint directory under ``cache`` (read back from an entry's header)."""
    (entry,) = entries(cache)[:1]
    return entry.read_bytes()[8:40].hex()


def test_the_size_bound_evicts_least_recently_used_entries(tmp_path) -> None:
    features = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)
    fingerprint = "ab" * 32
    cache = FeatureCache(tmp_path, fingerprint, 8, max_bytes=10_000)
    for key in ("1" * 64, "2" * 64, "3" * 64):
        cache.store(key, features)
    entry_size = cache.entry("1" * 64).stat().st_size
    for age, key in enumerate(("1" * 64, "2" * 64, "3" * 64)):
        os.utime(cache.entry(key), (1_000_000 + age, 1_000_000))
    assert np.array_equal(cache.load("1" * 64), features)  # a hit: now the most recently used

    bounded = FeatureCache(tmp_path, fingerprint, 8, max_bytes=2 * entry_size)
    assert bounded.evict() == 2 * entry_size
    assert bounded.evicted == 1 and not cache.entry("2" * 64).exists()
    assert cache.entry("1" * 64).exists() and cache.entry("3" * 64).exists()


def test_a_build_keeps_the_cache_within_its_bound(product_dirs, tmp_path, fast) -> None:
    ok, _ = product_dirs
    cache = tmp_path / "cache"
    first = build(ok, tmp_path / "first", fast, feature_cache=str(cache))
    bound = 3.5 * entries(cache)[0].stat().st_size / 1024**3  # room for three images' features
    again = build(ok, tmp_path / "again", fast, feature_cache=str(cache), feature_cache_gb=bound)

    assert first["feature_cache"]["evicted"] == 0
    assert again["feature_cache"]["evicted"] == 5 and len(entries(cache)) == 3
    assert again["feature_cache"]["bytes"] <= again["feature_cache"]["max_bytes"]
    same_bank(first, again)
    off = build(ok, tmp_path / "off", fast, feature_cache=str(cache), feature_cache_gb=0)
    assert off["feature_cache"] is None


def test_the_task_environment_gives_the_script_this_workers_cache(product_dirs, tmp_path, monkeypatch,
                                                                 subprocess_env) -> None:
    """``build_environment`` (what the DAG's build task runs ``build_patchcore.sh`` with) names the worker's
    cache; the script passes it on, and its second build takes every image from there."""
    from inspection_refresh.config import Settings
    from inspection_refresh.tasks.patchcore.build import build_environment
    from inspection_refresh.tasks.patchcore.run import PatchcoreRun

    ok, defect = product_dirs
    monkeypatch.setenv("INSPECTION_CACHE_ROOT", str(tmp_path / "worker_cache"))
    monkeypatch.setenv("INSPECTION_PATCHCORE_FEATURE_CACHE_GB", "0.5")
    run = PatchcoreRun(run_id="manual__1", settings=Settings.from_env())
    contract = {"PRODUCT_CODE": "P0", "PATCHCORE_SHORTER": "96", "PATCHCORE_WEIGHTS": "random",
                "PATCHCORE_LAYERS": "layer2,layer3", "PATCHCORE_DEVICE": "cpu"}
    env = build_environment(run, contract, out_dir=tmp_path / "out1", defect_files=[defect / "defect_000.jpg"],
                            log_dir=tmp_path)
    assert env["PATCHCORE_FEATURE_CACHE"] == str(default_feature_cache_dir(tmp_path / "worker_cache"))
    assert env["PATCHCORE_FEATURE_CACHE_GB"] == "0.5"

    script_env = {**env, "OK_DIR": str(ok), "OMP_NUM_THREADS": subprocess_env.get("OMP_NUM_THREADS", "1")}
    for out in ("out1", "out2"):
        result = subprocess.run(["bash", str(SCRIPT)], check=False, capture_output=True, text=True, timeout=300,
                                env={**script_env, "OUT_DIR": str(tmp_path / out)})
        assert result.returncode == 0, result.stderr
    assert "[P0] features: 11 of 11 images from the cache, 0 extracted" in result.stderr
    assert "of 0.50 GB" in result.stderr

    monkeypatch.setenv("INSPECTION_PATCHCORE_FEATURE_CACHE_GB", "0")
    off = build_environment(PatchcoreRun(run_id="manual__2", settings=Settings.from_env()), contract,
                            out_dir=tmp_path / "out3", defect_files=[], log_dir=tmp_path)
    assert "PATCHCORE_FEATURE_CACHE" not in off and "PATCHCORE_FEATURE_CACHE_GB" not in off
    assert sys.executable == env["PYTHON"]
