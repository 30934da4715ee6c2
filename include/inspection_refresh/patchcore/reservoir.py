"""A bounded, uniform sample of patch features from a stream of images (reservoir sampling).

Keeps every row until ``capacity`` rows are held; after that row ``i`` (0-based, over
the whole stream) replaces a random slot with probability ``capacity / (i + 1)``
(Vitter's Algorithm R), vectorised per added batch. Deterministic for a seed.

With ``spill_dir`` the rows live in an unlinked temporary file there instead of in process
memory: 60 images of 1,024 patches at 3,584 dimensions are 880 MB, which the page cache
holds (and may drop) while the coreset search only keeps a 128-dimensional projection in
memory. Nothing is left on disk, even after a crash: the file has no name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


class FileRows:
    """``float32 [rows, dim]`` stored in an unlinked temporary file, read back by slice or by index.

    Supports what the coreset search and the builder need of an array: ``shape``, ``len()``,
    ``rows[start:stop]``, ``rows[index_array]`` and ``copy()``, each returning a numpy array.
    """

    def __init__(self, dim: int, directory: Path | str | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".patchcore-features-")
        self._fd = self._file.fileno()
        self.dim = dim
        self._row_bytes = dim * 4
        self.rows = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.dim

    def __len__(self) -> int:
        return self.rows

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` at row ``start`` (growing the file as needed)."""
        data = np.ascontiguousarray(rows, dtype=np.float32)
        view = memoryview(data).cast("B")
        offset, written = start * self._row_bytes, 0
        while written < len(view):
            written += os.pwrite(self._fd, view[written:], offset + written)
        self.rows = max(self.rows, start + len(data))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new array."""
        stop = min(stop, self.rows)
        out = np.empty((max(0, stop - start), self.dim), dtype=np.float32)
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], start * self._row_bytes + done)
            if got <= 0:
                raise OSError(f"short read from the temporary feature file at row {start}")
            done += got
        return out

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.rows)
            if step != 1:
                raise IndexError("FileRows slices take no step")
            return self.read(start, stop)
        indices = np.asarray(key, dtype=np.int64)
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        for position, index in enumerate(indices.tolist()):
            out[position] = self.read(index, index + 1)[0]
        return out

    def copy(self) -> np.ndarray:
        return self.read(0, self.rows)

    def close(self) -> None:
        self._file.close()


class PatchReservoir:
    """At most ``capacity`` rows of width ``dim``, a uniform sample of all rows added.

    ``expected`` (optional): how many rows will be added; preallocates
    ``min(capacity, expected)`` rows so an in-memory buffer never has to grow and be copied.
    ``spill_dir`` (optional): keep the rows in a temporary file in that directory (see the
    module docstring) rather than in memory.
    Each row also keeps the ``source`` it was added with (:attr:`sources`, e.g. the index of the
    image it came from), so a coreset of the rows knows which image each of its rows is a patch of.
    """

    def __init__(self, capacity: int, dim: int, seed: int = 0, expected: int | None = None,
                 spill_dir: Path | str | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self.size = 0
        self._rng = np.random.default_rng([seed, 2])
        self._file = FileRows(dim, spill_dir) if spill_dir is not None else None
        self._buffer = (np.empty((min(capacity, expected or 4096), dim), dtype=np.float32)
                        if self._file is None else None)
        self._sources = np.full(min(capacity, expected or 4096), -1, dtype=np.int32)

    @property
    def features(self) -> np.ndarray | FileRows:
        """The sample held now, ``float32 [size, dim]``: an array view, or the spill file's rows."""
        if self._file is not None:
            return self._file
        return self._buffer[: self.size]

    @property
    def sources(self) -> np.ndarray:
        """``int32 [size]``: the ``source`` each held row was added with (-1 when none was given)."""
        return self._sources[: self.size]

    @property
    def sampled(self) -> bool:
        """True once rows have been dropped (more were added than fit)."""
        return self.seen > self.size

    def add(self, rows: np.ndarray, source: int = -1) -> None:
        """Add ``rows`` (``[k, dim]``), in order; ``source`` (e.g. an image index) is recorded per row."""
        fill = min(self.capacity - self.size, len(rows))
        if fill:
            self._store(self.size, rows[:fill])
            if self.size + fill > len(self._sources):
                self._sources = np.concatenate(
                    [self._sources, np.full(max(fill, len(self._sources) // 2), -1, dtype=np.int32)])
            self._sources[self.size : self.size + fill] = source
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
        self._sources[slots[chosen]] = source
        if self._file is not None:
            for slot, row in zip(slots[chosen].tolist(), rest[chosen]):
                self._file.write(slot, row[None])
        else:
            self._buffer[slots[chosen]] = rest[chosen]
        self.seen += len(rest)

    def close(self) -> None:
        """Release the spill file (the in-memory buffer goes with the object)."""
        if self._file is not None:
            self._file.close()

    def _store(self, start: int, rows: np.ndarray) -> None:
        if self._file is not None:
            self._file.write(start, rows)
            return
        if start + len(rows) > len(self._buffer):
            grown = np.empty((min(self.capacity, max(start + len(rows), len(self._buffer) * 3 // 2)),
                              self._buffer.shape[1]), dtype=np.float32)
            grown[:start] = self._buffer[:start]
            self._buffer = grown
        self._buffer[start : start + len(rows)] = rows
