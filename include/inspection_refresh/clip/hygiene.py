"""Gallery hygiene for the CLIP index: duplicates, cross-gallery copies and product outliers.

The commonest way to break a retrieval gallery is data: the same photo uploaded twice, a
re-encoded or resized copy of one, the same photo in both the normal and the defect gallery,
or a photo filed under the wrong product. :func:`check_gallery` finds them from what the
index build has anyway -- each image's embedding and sha256 -- and returns a
:class:`GalleryReport` (counted, listed, JSON-able, one summary line).

* **Exact duplicates**: files with the same sha256 (same bytes), in groups.
* **Near-duplicates**: pairs of different files whose embeddings' cosine similarity is at least
  ``near_duplicate_cosine`` (:data:`NEAR_DUPLICATE_COSINE`). Embeddings are the index's
  L2-normalised open_clip vectors, so cosine is their dot product. 0.97 is chosen because the
  same image re-encoded (another JPEG quality) or resized by a pixel keeps its embedding almost
  unchanged (the tests measure > 0.99 for both), while different photos -- another part, another
  position -- move it by clearly more than 3 %; lower it to catch crops and re-shoots, raise it
  if distinct photos of a very uniform product get reported.
  Searched in blocks of rows (``embeddings[i:j] @ embeddings.T``), so memory stays at one block
  by ``n`` similarities (about 16 MB) however large the gallery; one pass finds the near-duplicates
  and the neighbours for the product check (10,000 x 512: 9.5 s, 190 MB peak for the whole
  process, measured on two cores shared about four times over).
* **In both galleries**: a file whose sha256 is also in the other gallery (normal <-> defect).
* **Product outliers**: an image whose ``outlier_neighbours`` nearest neighbours (by cosine,
  not counting itself, its exact duplicates or its near-duplicates, and only among images
  with a known product) are in the majority from one *other* product. Checked only when at
  least two products have ``outlier_neighbours + 1`` images or more, and only for images of
  such products (an image of a product with fewer could not have enough neighbours of its own).

numpy only: no torch, open_clip or Airflow at import.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NEAR_DUPLICATE_COSINE = 0.97
"""Cosine similarity (of L2-normalised open_clip embeddings) at or above which two files are near-duplicates."""
OUTLIER_NEIGHBOURS = 5
"""Nearest neighbours whose majority product decides whether an image is filed under the wrong product."""
_BLOCK_ELEMENTS = 1 << 22  # similarities per block: 16 MB of float32


@dataclass
class GalleryReport:
    """What :func:`check_gallery` found in one gallery; every list is sorted (see the fields)."""

    exact_duplicates: list[list[str]] = field(default_factory=list)
    """Groups of files with the same sha256 (each group >= 2 files, sorted; groups by first file)."""
    near_duplicates: list[tuple[str, str, float]] = field(default_factory=list)
    """``(file, file, cosine)`` pairs at or above the threshold that are not exact duplicates, highest first."""
    in_both_galleries: list[tuple[str, str]] = field(default_factory=list)
    """``(file here, file in the other gallery)`` with the same sha256."""
    product_outliers: list[tuple[str, str, str]] = field(default_factory=list)
    """``(file, its product, the product most of its neighbours belong to)``."""

    def counts(self) -> dict[str, int]:
        """How many of each: exact duplicates count the files beyond the first of each group."""
        return {
            "exact_duplicates": sum(len(group) - 1 for group in self.exact_duplicates),
            "near_duplicates": len(self.near_duplicates),
            "in_both_galleries": len(self.in_both_galleries),
            "product_outliers": len(self.product_outliers),
        }

    def flagged(self) -> bool:
        """True when anything was found."""
        return any(self.counts().values())

    def to_dict(self, limit: int = 50) -> dict[str, Any]:
        """JSON-able: ``counts``, each list cut to ``limit`` entries, and ``totals`` (list lengths before the cut)."""
        lists = {
            "exact_duplicates": [list(group) for group in self.exact_duplicates],
            "near_duplicates": [[a, b, round(float(cosine), 6)] for a, b, cosine in self.near_duplicates],
            "in_both_galleries": [list(pair) for pair in self.in_both_galleries],
            "product_outliers": [list(entry) for entry in self.product_outliers],
        }
        return {"counts": self.counts(), **{name: items[:limit] for name, items in lists.items()},
                "totals": {name: len(items) for name, items in lists.items()},
                "truncated": any(len(items) > limit for items in lists.values())}

    def summary(self) -> str:
        """One line for logs and rows, e.g. ``"2 exact duplicates, 1 near-duplicate, 0 in both galleries, ..."``."""
        counts = self.counts()
        words = {"exact_duplicates": ("exact duplicate", "exact duplicates"),
                 "near_duplicates": ("near-duplicate pair", "near-duplicate pairs"),
                 "in_both_galleries": ("file in both galleries", "files in both galleries"),
                 "product_outliers": ("product outlier", "product outliers")}
        line = ", ".join(f"{counts[key]} {one if counts[key] == 1 else many}" for key, (one, many) in words.items())
        return line if self.flagged() else f"gallery clean: {line}"


def check_gallery(embeddings: np.ndarray, files: Sequence[str], sha256s: Sequence[str],
                  products: Sequence[str | None], other_gallery: Mapping[str, str] | None = None, *,
                  near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE,
                  outlier_neighbours: int = OUTLIER_NEIGHBOURS, by_similarity: bool = True) -> GalleryReport:
    """Check one gallery: ``embeddings[i]`` (``[n, d]``, L2-normalised) is ``files[i]`` with ``sha256s[i]``
    of ``products[i]`` (``None``: unknown).

    other_gallery: sha256 -> file of the other gallery (normal <-> defect).
    by_similarity: also look for near-duplicates and product outliers (the embedding checks); off, only
    file content is compared (for embeddings that mean nothing, e.g. random demo weights).
    Raises ``ValueError`` naming the argument when the lengths disagree.
    """
    vectors = np.asarray(embeddings, dtype=np.float32)
    count = len(files)
    if vectors.ndim != 2 or vectors.shape[0] != count or len(sha256s) != count or len(products) != count:
        raise ValueError(f"check_gallery: embeddings {vectors.shape}, files {count}, sha256s {len(sha256s)} and "
                         f"products {len(products)} must describe the same images (one row each)")
    if outlier_neighbours < 1:
        raise ValueError(f"check_gallery: outlier_neighbours must be >= 1, got {outlier_neighbours}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)  # cosine even if a caller passes raw vectors
    files, sha256s = [str(f) for f in files], [str(s) for s in sha256s]

    by_sha: dict[str, list[int]] = defaultdict(list)
    for index, sha in enumerate(sha256s):
        by_sha[sha].append(index)
    groups = sorted(sorted(files[i] for i in members) for members in by_sha.values() if len(members) > 1)
    other = other_gallery or {}
    in_both = sorted((files[i], other[sha]) for i, sha in enumerate(sha256s) if sha in other)
    sha_ids = np.unique(np.asarray(sha256s, dtype=object), return_inverse=True)[1] if count else np.zeros(0, int)

    near, outliers = (_scan(vectors, sha_ids, list(products), near_duplicate_cosine, outlier_neighbours)
                      if by_similarity else ([], []))
    near_pairs = sorted(((min(files[i], files[j]), max(files[i], files[j]), cosine) for i, j, cosine in near),
                        key=lambda pair: (-pair[2], pair[0], pair[1]))
    return GalleryReport(groups, near_pairs, in_both,
                         sorted((files[i], str(products[i]), other_product) for i, other_product in outliers))


def _scan(vectors: np.ndarray, sha_ids: np.ndarray, products: list[str | None], threshold: float,
          k: int) -> tuple[list[tuple[int, int, float]], list[tuple[int, str]]]:
    """One pass over ``vectors @ vectors.T``, a block of rows at a time: near-duplicate pairs
    ``(i, j, cosine)`` (``i < j``, different sha256) and product outliers ``(i, majority product)``."""
    count = len(vectors)
    known = np.asarray([i for i, product in enumerate(products) if product is not None], dtype=np.int64)
    names, label_ids = np.unique(np.asarray([products[i] for i in known], dtype=object), return_inverse=True)
    sizes = np.bincount(label_ids, minlength=len(names)) if len(known) else np.zeros(0, dtype=np.int64)
    checked = sizes >= k + 1  # per product: enough images to have k neighbours of its own
    label_of = np.full(count, -1, dtype=np.int64)
    label_of[known] = label_ids
    check_outliers = int(checked.sum()) >= 2
    copies: dict[int, list[int]] = {}  # sha id -> the rows with it, for sha256s held by more than one row
    for row, sha in enumerate(sha_ids.tolist()):
        copies.setdefault(sha, []).append(row)
    copies = {sha: rows for sha, rows in copies.items() if len(rows) > 1}
    near: list[tuple[int, int, float]] = []
    outliers: list[tuple[int, str]] = []
    step = max(1, _BLOCK_ELEMENTS // max(1, count))
    for start in range(0, count, step):
        rows = np.arange(start, min(count, start + step))
        similarities = vectors[rows] @ vectors.T
        # Copies of a row, never its neighbours: near-duplicates (>= threshold; few, so found sparsely),
        # itself and its exact duplicates (same sha256).
        pair_rows, pair_cols = np.nonzero(similarities >= threshold)
        pair = (pair_cols > rows[pair_rows]) & (sha_ids[rows[pair_rows]] != sha_ids[pair_cols])
        near += [(int(rows[r]), int(c), float(similarities[r, c])) for r, c in zip(pair_rows[pair], pair_cols[pair])]
        similarities[pair_rows, pair_cols] = -np.inf
        similarities[np.arange(len(rows)), rows] = -np.inf
        for offset, row in enumerate(rows.tolist()):
            similarities[offset, copies.get(int(sha_ids[row]), [])] = -np.inf
        candidates = rows[(label_of[rows] >= 0) & checked[np.maximum(label_of[rows], 0)]] if check_outliers else []
        if not len(candidates):
            continue
        pool = similarities[np.ix_(candidates - start, known)]
        take = min(k, len(known))
        nearest = np.argpartition(-pool, take - 1, axis=1)[:, :take]
        reachable = np.isfinite(np.take_along_axis(pool, nearest, axis=1))
        for index, neighbours, ok in zip(candidates.tolist(), nearest, reachable):
            votes = np.bincount(label_ids[neighbours[ok]], minlength=len(names))
            majority = int(np.argmax(votes))
            if majority != label_of[index] and votes[majority] > k / 2:
                outliers.append((index, str(names[majority])))
    return near, outliers
