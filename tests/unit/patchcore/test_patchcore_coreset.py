"""Greedy k-center coreset: exact agreement with a brute-force greedy, coverage, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from inspection_refresh.patchcore.coreset import KCenterGreedy, first_index, gaussian_projection


def brute_force_k_center(points: np.ndarray, n: int, first: int) -> list[int]:
    """Textbook greedy k-center in float64: explicit distances to every picked point, no tricks."""
    picked = [first]
    while len(picked) < n:
        dists = np.stack([((points - points[i]) ** 2).sum(axis=1) for i in picked])  # [picked, N]
        nearest = dists.min(axis=0)
        nearest[picked] = -1.0
        picked.append(int(np.argmax(nearest)))
    return picked


def covering_radius(points: np.ndarray, centers: np.ndarray) -> float:
    """Largest distance from any point to its nearest center (what k-center minimises)."""
    d2 = ((points[:, None, :] - points[None, centers, :]) ** 2).sum(axis=2)
    return float(np.sqrt(d2.min(axis=1).max()))


@pytest.mark.parametrize("dim, projection_dim", [(300, 32), (16, 128)])
@pytest.mark.parametrize("seed", [0, 7])
def test_matches_brute_force_greedy(dim: int, projection_dim: int, seed: int) -> None:
    features = np.random.default_rng(seed + 100).standard_normal((400, dim)).astype(np.float32)
    # dim > projection_dim: compare in the projected space; otherwise the raw features are used.
    space = features.astype(np.float64)
    if dim > projection_dim:
        space = features.astype(np.float64) @ gaussian_projection(dim, projection_dim, seed).astype(np.float64)
    expected = brute_force_k_center(space, 40, first_index(len(features), seed))

    picked = KCenterGreedy(projection_dim=projection_dim, seed=seed, chunk_rows=64).select(features, 40)

    assert picked.tolist() == expected


def test_covers_better_than_random_selection() -> None:
    rng = np.random.default_rng(3)
    # Clusters of very different sizes: random picks land in the big ones and miss small ones.
    sizes = [600, 200, 50, 20, 10, 5, 5, 5, 3, 2]
    centers = rng.standard_normal((len(sizes), 64)) * 6
    features = np.concatenate([c + rng.standard_normal((s, 64)) for c, s in zip(centers, sizes)]).astype(np.float32)
    n = 30

    greedy = covering_radius(features, KCenterGreedy(projection_dim=32, seed=0).select(features, n))
    randoms = [covering_radius(features, rng.choice(len(features), n, replace=False)) for _ in range(10)]

    assert greedy < min(randoms)


def test_deterministic_and_returns_distinct_real_indices() -> None:
    features = np.random.default_rng(0).standard_normal((2000, 200)).astype(np.float32)
    first = KCenterGreedy(seed=5).select(features, 150)
    again = KCenterGreedy(seed=5).select(features, 150)
    other = KCenterGreedy(seed=6).select(features, 150)

    assert first.dtype == np.int64 and first.shape == (150,)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len(set(first.tolist())) == 150 and first.min() >= 0 and first.max() < 2000


def test_edge_cases_duplicates_all_and_read_only_input() -> None:
    duplicates = np.ones((50, 8), dtype=np.float32)
    picked = KCenterGreedy(seed=0).select(duplicates, 10)
    assert len(set(picked.tolist())) == 10  # identical points still give distinct indices

    features = np.random.default_rng(1).standard_normal((30, 8)).astype(np.float32)
    assert KCenterGreedy().select(features, 30).tolist() == list(range(30))
    assert len(KCenterGreedy().select(features, 500)) == 30
    assert len(KCenterGreedy().select(features, 0)) == 1

    features.setflags(write=False)  # e.g. a read-only memmap: read, never written
    assert len(KCenterGreedy(projection_dim=4).select(features, 5)) == 5

    with pytest.raises(ValueError, match="zero features"):
        KCenterGreedy().select(np.empty((0, 8), dtype=np.float32), 3)


def test_reports_progress() -> None:
    class Counter:
        done = 0

        def update(self, items: int = 1, nbytes: int = 0) -> None:
            self.done += items

    counter = Counter()
    KCenterGreedy(seed=0).select(np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32), 1100,
                                 progress=counter)
    assert counter.done == 1100


def test_continuing_from_initial_centers_matches_brute_force() -> None:
    rng = np.random.default_rng(11)
    features = rng.standard_normal((300, 200)).astype(np.float32)
    initial = rng.standard_normal((25, 200)).astype(np.float32)
    projection = gaussian_projection(200, 32, 4).astype(np.float64)
    space, centers = features.astype(np.float64) @ projection, initial.astype(np.float64) @ projection

    nearest = ((space[:, None, :] - centers[None]) ** 2).sum(axis=2).min(axis=1)
    expected, current = [], int(np.argmax(nearest))
    for _ in range(30):  # brute force: the farthest point from initial centers and all picks so far
        expected.append(current)
        nearest = np.minimum(nearest, ((space - space[current]) ** 2).sum(axis=1))
        nearest[expected] = -1.0
        current = int(np.argmax(nearest))

    picked = KCenterGreedy(projection_dim=32, seed=4).select(features, 30, initial=initial)

    assert picked.tolist() == expected
    assert KCenterGreedy(projection_dim=32).select(features, 0, initial=initial).shape == (0,)


def test_seeded_with_a_greedy_prefix_it_continues_that_greedy() -> None:
    """Seeds = the first picks of a full greedy: the rest of the picks are the full greedy's (a warm start
    with nothing changed loses nothing), and the seeds come back first, in their order."""
    features = np.random.default_rng(5).standard_normal((1500, 200)).astype(np.float32)
    sampler = KCenterGreedy(projection_dim=32, seed=3)
    full = sampler.select(features, 60)

    warm = sampler.select(features, 60, seeds=np.concatenate([full[:25], full[:3]]))  # repeats are dropped
    everything = sampler.select(features, 60, seeds=full[::-1])

    assert warm.tolist() == full.tolist()
    assert everything.tolist() == full[::-1].tolist()  # as many seeds as picks: returned as they are


def test_seeds_after_initial_centers_are_never_picked_again() -> None:
    features = np.random.default_rng(6).standard_normal((800, 16)).astype(np.float32)
    seeds = np.array([10, 500, 42])
    picked = KCenterGreedy(seed=0).select(features, 30, initial=features[:5], seeds=seeds)

    assert picked[:3].tolist() == seeds.tolist()
    assert len(set(picked.tolist())) == 30
    with pytest.raises(ValueError, match="row indices"):
        KCenterGreedy(seed=0).select(features, 30, seeds=np.array([800]))
