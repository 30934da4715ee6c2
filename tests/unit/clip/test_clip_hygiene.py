"""Gallery hygiene (:mod:`inspection_refresh.clip.hygiene`): real open_clip embeddings and constructed vectors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspection_refresh.clip.hygiene import NEAR_DUPLICATE_COSINE, OUTLIER_NEIGHBOURS, GalleryReport, check_gallery
from inspection_refresh.dev.samples import render_normal


# The tests' CLIP model has random weights (offline): it puts every photo of one sample texture within 0.99 of
# the others (measured 0.995-0.998), where the pretrained model spreads them; re-encodes and one-pixel resizes
# stay at 1.000 either way. The real-embedding tests therefore use a stricter threshold than the default.
RANDOM_MODEL_NEAR_DUPLICATE = 0.9995


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """Seven photos each of two products, an exact copy, a JPEG re-encode and a one-pixel resize."""
    directory = tmp_path_factory.mktemp("gallery")
    for product in range(2):
        for seed in range(7):
            render_normal(product, seed, (320, 320)).save(directory / f"p{product}_{seed}.jpg", quality=90)
    shutil.copyfile(directory / "p0_0.jpg", directory / "p0_0_copy.jpg")
    Image.open(directory / "p0_1.jpg").save(directory / "p0_1_q70.jpg", quality=70)
    Image.open(directory / "p1_2.jpg").resize((319, 320)).save(directory / "p1_2_319.jpg", quality=90)
    return directory


def test_real_embeddings_report_copy_re_encode_resize_and_cross_gallery(gallery: Path, clip_model) -> None:
    from inspection_refresh.clip.embed import embed_image

    files = sorted(p.name for p in gallery.iterdir())
    embeddings = np.stack([embed_image(gallery / name, clip_model) for name in files])
    sha256s = [_sha(gallery / name) for name in files]
    products = [name[:2] for name in files]
    defect_gallery = {_sha(gallery / "p1_4.jpg"): "defect/p1_4_scratch.jpg"}

    report = check_gallery(embeddings, files, sha256s, products, defect_gallery,
                           near_duplicate_cosine=RANDOM_MODEL_NEAR_DUPLICATE)

    assert report.exact_duplicates == [["p0_0.jpg", "p0_0_copy.jpg"]]
    near = {(a, b) for a, b, _ in report.near_duplicates}
    assert near == {("p0_1.jpg", "p0_1_q70.jpg"), ("p1_2.jpg", "p1_2_319.jpg")}, report.near_duplicates
    assert all(cosine > 0.999 for _, _, cosine in report.near_duplicates)
    assert ("p0_0.jpg", "p0_0_copy.jpg") not in near  # an exact duplicate is not also a near-duplicate
    assert report.in_both_galleries == [("p1_4.jpg", "defect/p1_4_scratch.jpg")]
    counts = report.counts()
    assert counts["exact_duplicates"] == 1 and counts["in_both_galleries"] == 1
    assert counts["near_duplicates"] == 2
    assert report.flagged()
    assert report.product_outliers == []  # every photo is filed under its own product
    json.dumps(report.to_dict())


def test_real_embeddings_report_a_photo_filed_under_the_wrong_product(gallery: Path, clip_model) -> None:
    from inspection_refresh.clip.embed import embed_image

    files = sorted(p.name for p in gallery.iterdir() if "_" not in p.stem[3:])  # the fourteen originals
    embeddings = np.stack([embed_image(gallery / name, clip_model) for name in files])
    products = ["BRKT" if name.startswith("p0") else "HSNG" for name in files]
    products[files.index("p1_5.jpg")] = "BRKT"  # a housing photo uploaded into the bracket folder

    report = check_gallery(embeddings, files, [_sha(gallery / name) for name in files], products,
                           near_duplicate_cosine=RANDOM_MODEL_NEAR_DUPLICATE)

    assert report.product_outliers == [("p1_5.jpg", "BRKT", "HSNG")]


def _unit(*rows: list[float]) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_near_duplicates_at_the_threshold_and_exact_duplicates_are_not_pairs() -> None:
    just_above = np.arccos(NEAR_DUPLICATE_COSINE) - 1e-4  # cosine 0.97002
    just_below = np.arccos(NEAR_DUPLICATE_COSINE - 1e-3)  # cosine 0.969
    embeddings = _unit([1, 0, 0], [np.cos(just_above), np.sin(just_above), 0], [1, 0, 0],
                       [0, 1, 0], [0, np.cos(just_below), np.sin(just_below)])
    files = ["a.jpg", "b.jpg", "a_again.jpg", "c.jpg", "d.jpg"]
    report = check_gallery(embeddings, files, ["x", "y", "x", "z", "w"], [None] * 5)

    assert report.exact_duplicates == [["a.jpg", "a_again.jpg"]]
    assert [(a, b) for a, b, _ in report.near_duplicates] == [("a.jpg", "b.jpg"), ("a_again.jpg", "b.jpg")]
    assert report.near_duplicates[0][2] == pytest.approx(NEAR_DUPLICATE_COSINE, abs=1e-4)
    assert report.counts() == {"exact_duplicates": 1, "near_duplicates": 2, "in_both_galleries": 0,
                               "product_outliers": 0}
    stricter = check_gallery(embeddings, files, ["x", "y", "x", "z", "w"], [None] * 5, near_duplicate_cosine=0.99)
    assert stricter.near_duplicates == []


def _clusters(sizes: dict[str, int], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for product, size in sizes.items():
        centre = rng.standard_normal(32)
        rows += [centre + 0.4 * rng.standard_normal(32) for _ in range(size)]
        labels += [product] * size
    return _unit(*rows), labels


def test_product_outliers_need_a_majority_of_one_other_product_and_two_large_products() -> None:
    embeddings, products = _clusters({"A": 8, "B": 8, "C": 2})
    files = [f"{p}{i}.jpg" for i, p in enumerate(products)]
    shas = [f"sha{i}" for i in range(len(files))]
    misfiled = products.copy()
    misfiled[2] = "B"  # an A photo filed under B

    report = check_gallery(embeddings, files, shas, misfiled)

    assert ("A2.jpg", "B", "A") in report.product_outliers
    assert all(entry[1] != "C" for entry in report.product_outliers)  # C (2 images) is never checked
    assert check_gallery(embeddings, files, shas, products).product_outliers == []
    # Without the embedding checks (random demo weights) only file content is compared.
    content_only = check_gallery(embeddings, files, shas, misfiled, {"sha0": "defect/x.jpg"}, by_similarity=False)
    assert content_only.product_outliers == [] and content_only.near_duplicates == []
    assert content_only.in_both_galleries == [("A0.jpg", "defect/x.jpg")]
    # Only one product with >= OUTLIER_NEIGHBOURS + 1 images: nothing to compare with, nothing reported.
    small = check_gallery(embeddings, files, shas, ["A"] * 8 + ["B"] * 3 + [None] * 7)
    assert small.product_outliers == []


def test_a_copy_is_not_counted_as_a_neighbour() -> None:
    # B0 sits in product A's cluster with four exact copies of itself; without them its neighbours are A's.
    embeddings, products = _clusters({"A": 8, "B": 6})
    embeddings = np.concatenate([embeddings, np.repeat(embeddings[:1], 4, axis=0)])
    products = ["B"] + products[1:] + ["B"] * 4
    files = [f"f{i}.jpg" for i in range(len(products))]
    shas = ["same"] + [f"s{i}" for i in range(1, 14)] + ["same"] * 4

    report = check_gallery(embeddings, files, shas, products, outlier_neighbours=OUTLIER_NEIGHBOURS)

    assert ("f0.jpg", "B", "A") in report.product_outliers
    assert report.counts()["exact_duplicates"] == 4


def test_report_to_dict_truncates_lists_and_keeps_totals() -> None:
    report = GalleryReport(exact_duplicates=[["a", "b", "c"], ["d", "e"]],
                           near_duplicates=[("f", "g", 0.99), ("h", "i", 0.98), ("j", "k", 0.975)],
                           in_both_galleries=[("l", "defect/l")], product_outliers=[])
    data = report.to_dict(limit=1)

    assert data["counts"] == {"exact_duplicates": 3, "near_duplicates": 3, "in_both_galleries": 1,
                              "product_outliers": 0}
    assert data["near_duplicates"] == [["f", "g", 0.99]] and data["exact_duplicates"] == [["a", "b", "c"]]
    assert data["totals"] == {"exact_duplicates": 2, "near_duplicates": 3, "in_both_galleries": 1,
                              "product_outliers": 0}
    assert data["truncated"] is True
    assert report.summary() == ("3 exact duplicates, 3 near-duplicate pairs, 1 file in both galleries, "
                                "0 product outliers")
    assert GalleryReport().summary().startswith("gallery clean: ") and not GalleryReport().flagged()


def test_mismatched_lengths_name_the_arguments() -> None:
    with pytest.raises(ValueError, match="sha256s 1"):
        check_gallery(np.eye(2, dtype=np.float32), ["a", "b"], ["x"], [None, None])
