"""PatchCore coreset: greedy k-center selection on a seeded Gaussian random projection.

The sampler picks, one at a time, the patch farthest from everything picked so far
(Gonzalez' 2-approximation of the k-center problem), as in PatchCore and anomalib's
``KCenterGreedy``. Distances are measured after projecting the features to
``projection_dim`` dimensions with a Gaussian matrix (Johnson-Lindenstrauss), so one
step is a single pass over a small projected matrix; the indices returned are of
the *original* rows, so the bank holds real patch features.

Cost: the input is read once, in chunks, for the projection and never copied; a step
is one matrix-vector product over the projected ``[projection_dim, N]`` matrix (kept
transposed: the fastest layout for BLAS ``gemv`` here) plus a few ``O(N)`` vector
operations on a min-distance vector -- never an ``N x N`` matrix. numpy only: no torch
import, so a stand-alone selection stays small in memory.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np


_CHUNK_BYTES = 32 << 20  # features read at a time for the projection (wide features: fewer rows)


class _Progress(Protocol):
    def update(self, items: int = 1, nbytes: int = 0) -> None: ...


def gaussian_projection(in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    """``float32 [in_dim, out_dim]``, entries N(0, 1/out_dim) from ``numpy.random.default_rng(seed)``."""
    matrix = np.random.default_rng(seed).standard_normal((in_dim, out_dim), dtype=np.float32)
    matrix *= np.float32(1.0 / math.sqrt(out_dim))
    return matrix


def first_index(num_points: int, seed: int) -> int:
    """The seeded first pick: ``numpy.random.default_rng([seed, 1]).integers(num_points)``."""
    return int(np.random.default_rng([seed, 1]).integers(num_points))


class KCenterGreedy:
    """Greedy k-center coreset sampler, deterministic for a seed.

    Args:
        projection_dim: dimensions of the random projection; features with at most
            this many dimensions are used unprojected.
        seed: seeds the projection matrix and the first pick.
        chunk_rows: rows projected at a time (bounds the projection's temporary memory).
    """

    def __init__(self, projection_dim: int = 128, seed: int = 0, chunk_rows: int = 8192) -> None:
        self.projection_dim = projection_dim
        self.seed = seed
        self.chunk_rows = chunk_rows

    def select(self, features: np.ndarray, n: int, progress: _Progress | None = None,
               initial: np.ndarray | None = None, seeds: np.ndarray | None = None) -> np.ndarray:
        """Row indices (``int64 [n]``, in pick order) of ``n`` rows of ``features`` ``[N, D]`` covering the rest.

        ``initial`` (optional, ``[m, D]``): points already in the coreset, e.g. a coreset of a
        subset; the greedy then continues from them -- every pick is still the point farthest
        from all points chosen so far -- and returns the ``n`` *further* picks. Without it the
        first pick is :func:`first_index`. ``n`` is clipped to ``[0 or 1, N]``; ``n == N`` without
        ``initial`` returns ``arange(N)``. Ties go to the lowest index.
        ``seeds`` (optional): row indices taken as the first picks, in their order (a warm start
        from an earlier build's picks; duplicates dropped, at most ``n`` kept). The greedy then
        continues from them (and ``initial``) for the remaining picks, their distances to all seeds
        computed at once with blocked matrix products rather than one pass per seed; with as many
        seeds as picks nothing is projected or searched.
        ``progress.update(k)`` is called every 512 picks.
        """
        num_points = int(features.shape[0])
        if num_points == 0:
            raise ValueError("cannot select a coreset from zero features")
        n = max(0 if initial is not None else 1, min(int(n), num_points))
        if initial is None and n == num_points:
            return np.arange(num_points, dtype=np.int64)
        seeds = _unique_in_order(seeds, num_points)[:n] if seeds is not None else np.empty(0, dtype=np.int64)
        if len(seeds) and progress is not None:
            progress.update(len(seeds))
        if len(seeds) == n:
            return seeds.copy()
        points_t = self._project_transposed(features)  # [k, N]
        sq_norms = np.einsum("ij,ij->j", points_t, points_t)
        centers = [self._project_transposed(initial)] if initial is not None else []
        centers += [points_t[:, seeds]] if len(seeds) else []
        if not centers:
            min_dist = np.full(num_points, np.inf, dtype=np.float32)
            current = first_index(num_points, self.seed)
        else:
            min_dist = _nearest_sq_distances(points_t, sq_norms, np.concatenate(centers, axis=1))
            min_dist[seeds] = -1.0  # picked already
            current = int(np.argmax(min_dist))
        dist = np.empty(num_points, dtype=np.float32)
        picked = np.empty(n, dtype=np.int64)
        picked[: len(seeds)] = seeds
        for step in range(len(seeds), n):
            picked[step] = current
            # ||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2 for every p, in one pass over the points.
            np.dot(points_t[:, current] * np.float32(-2.0), points_t, out=dist)
            dist += sq_norms
            dist += sq_norms[current]
            np.minimum(min_dist, dist, out=min_dist)
            min_dist[current] = -1.0  # picked: never the farthest again, even among duplicates
            current = int(np.argmax(min_dist))
            if progress is not None and (step + 1 - len(seeds)) % 512 == 0:
                progress.update(512)
        if progress is not None and (n - len(seeds)) % 512:
            progress.update((n - len(seeds)) % 512)
        return picked

    def _project_transposed(self, features: np.ndarray) -> np.ndarray:
        """``float32 [k, N]``: the projected points as columns; reads ``features`` chunk by chunk."""
        num_points, dim = int(features.shape[0]), int(features.shape[1])
        if dim <= self.projection_dim:
            return np.ascontiguousarray(np.asarray(features, dtype=np.float32).T)
        matrix = gaussian_projection(dim, self.projection_dim, self.seed)
        out = np.empty((self.projection_dim, num_points), dtype=np.float32)
        chunk_rows = max(1, min(self.chunk_rows, _CHUNK_BYTES // (dim * 4)))
        for start in range(0, num_points, chunk_rows):
            chunk = np.asarray(features[start : start + chunk_rows], dtype=np.float32)
            out[:, start : start + chunk.shape[0]] = (chunk @ matrix).T
        return out


def _nearest_sq_distances(points_t: np.ndarray, sq_norms: np.ndarray, centers_t: np.ndarray,
                          block: int = 256) -> np.ndarray:
    """Squared distance from each column of ``points_t`` to its nearest column of ``centers_t``.

    ``min_c(||c||^2 - 2 p.c) + ||p||^2``, a matrix product per ``block`` centers.
    """
    nearest = np.full(points_t.shape[1], np.inf, dtype=np.float32)
    for start in range(0, centers_t.shape[1], block):
        centers = centers_t[:, start : start + block]
        products = (centers.T * np.float32(-2.0)) @ points_t  # [block, N]
        products += np.einsum("ij,ij->j", centers, centers)[:, None]
        np.minimum(nearest, products.min(axis=0), out=nearest)
    nearest += sq_norms
    return nearest


def _unique_in_order(indices: np.ndarray, num_points: int) -> np.ndarray:
    """``int64`` copy of ``indices`` without repeats (first occurrence kept); all must be in ``[0, num_points)``."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) and (indices.min() < 0 or indices.max() >= num_points):
        raise ValueError(f"coreset seeds must be row indices in [0, {num_points})")
    _, first = np.unique(indices, return_index=True)
    return indices[np.sort(first)]
