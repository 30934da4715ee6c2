"""A bounded, uniform sample of patch features from a stream of images (reservoir sampling).

Keeps every row until ``capacity`` rows are held; after that row ``i`` (0-based, over
the whole stream) replaces a random slot with probability ``capacity / (i + 1)``
(Vitter's Algorithm R), vectorised per added batch. Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np


class PatchReservoir:
    """At most ``capacity`` rows of width ``dim``, a uniform sample of all rows added.

    ``expected`` (optional): how many rows will be added; preallocates
    ``min(capacity, expected)`` rows so the buffer never has to grow and be copied.
    """

    def __init__(self, capacity: int, dim: int, seed: int = 0, expected: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self.size = 0
        self._rng = np.random.default_rng([seed, 2])
        self._buffer = np.empty((min(capacity, expected or 4096), dim), dtype=np.float32)

    @property
    def features(self) -> np.ndarray:
        """The sample held now, ``float32 [size, dim]`` (a view, not a copy)."""
        return self._buffer[: self.size]

    @property
    def sampled(self) -> bool:
        """True once rows have been dropped (more were added than fit)."""
        return self.seen > self.size

    def add(self, rows: np.ndarray) -> None:
        """Add ``rows`` (``[k, dim]``), in order."""
        fill = min(self.capacity - self.size, len(rows))
        if fill:
            self._reserve(self.size + fill)
            self._buffer[self.size : self.size + fill] = rows[:fill]
            self.size += fill
            self.seen += fill
        rest = rows[fill:]
        if not len(rest):
            return
        positions = self.seen + np.arange(len(rest), dtype=np.float64)
        slots = (self._rng.random(len(rest)) * (positions + 1)).astype(np.int64)  # uniform in [0, position]
        chosen = np.flatnonzero(slots < self.capacity)
        # Several rows may draw the same slot: the later one wins, as if added one by one.
        _, last_from_end = np.unique(slots[chosen][::-1], return_index=True)
        chosen = chosen[len(chosen) - 1 - last_from_end]
        self._buffer[slots[chosen]] = rest[chosen]
        self.seen += len(rest)

    def _reserve(self, rows: int) -> None:
        if rows > len(self._buffer):
            grown = np.empty((min(self.capacity, max(rows, len(self._buffer) * 3 // 2)), self._buffer.shape[1]),
                             dtype=np.float32)
            grown[: self.size] = self._buffer[: self.size]
            self._buffer = grown
