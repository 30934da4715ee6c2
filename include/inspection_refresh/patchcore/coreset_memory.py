"""The previous build's coreset picks, so a rebuild's greedy starts from them (a warm start).

A rebuild after a few images were added or removed sees mostly the same patches as last time,
and the last greedy k-center picks still cover them. :class:`CoresetMemory` keeps, per product
and per coreset (``calibration``, ``bank``), which patches were picked -- as (image sha256, row
of that image's features) -- in ``<feature cache>/<fingerprint[:16]>/selections/<key>.json``
(``key`` hashes the product's name and every option that shapes a selection). The next build
seeds :meth:`.coreset.KCenterGreedy.select` with the picks whose patches it still holds, in
their order, and searches greedily only for the rest: nothing at all when no image changed.

* **Equally good, not identical**: after a change the bank differs from a build from scratch
  (the greedy's order differs), but it is still made of real patches, every new pick is the
  patch farthest from all picks so far, and it has the same number of rows. The tests and the
  bench hold it to the same held-out AUROC and tau within :data:`TAU_RELATIVE_TOLERANCE`.
  With no change it *is* the previous bank, bit for bit.
* **Only where rows are whole images**: once the reservoir subsamples (more patches than
  ``reservoir_max``) a row no longer says which patch of which image it is, so the build runs
  the full greedy and stores nothing.
* **Safe to lose**, like the feature cache: an absent, unreadable or foreign file means a full
  greedy (logged); written by atomic rename; a failed write only warns.

Only the standard library and numpy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("inspection_refresh.patchcore.build")  # the builder's log lines, as product.py

SELECTIONS_SUBDIR = "selections"
TAU_RELATIVE_TOLERANCE = 0.10
"""How far a warm-started build's tau (pixel and image) may be from a build from scratch's, relative.

As far as another equally valid greedy moves it: on the tests' 13-image products, changing only the
projection (``projection_dim`` 128 / 96 / 64) moved tau by up to 7 % and a warm start by up to 7 %;
on the bench's product (30-60 images of 1,024 patches) a warm start moved it by under 1 %."""
_FORMAT = 1
_OPTIONS = ("coreset", "projection_dim", "seed", "holdout", "reservoir_max", "final_coreset")


class RowLayout:
    """Which patch each reservoir row is: rows ``offset .. offset + count`` are image ``keys[i]``'s rows, in order."""

    def __init__(self, keys: Sequence[str], counts: Sequence[int]) -> None:
        self.keys = list(keys)
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        self.first = {}  # an image present twice (identical bytes): its first copy's rows
        for index, key in enumerate(self.keys):
            self.first.setdefault(key, index)

    def picks(self, rows: np.ndarray) -> list[list[Any]]:
        """``[[sha256, row within the image], ...]`` for reservoir ``rows``."""
        images = np.searchsorted(self.offsets, rows, side="right") - 1
        return [[self.keys[i], int(r - self.offsets[i])] for i, r in zip(images.tolist(), rows.tolist())]

    def rows(self, picks: list[list[Any]]) -> np.ndarray:
        """Reservoir rows of the ``picks`` still present (same image, row in range), in their order."""
        found = []
        for key, row in picks:
            index = self.first.get(key)
            if index is not None and 0 <= row < self.offsets[index + 1] - self.offsets[index]:
                found.append(int(self.offsets[index] + row))
        return np.asarray(found, dtype=np.int64)


class CoresetMemory:
    """One product's previous picks at ``path``; :meth:`seeds` reads them, :meth:`remember` + :meth:`save` write."""

    def __init__(self, path: Path, tag: str) -> None:
        self.path = path
        self.tag = tag
        self._previous: dict[str, list[list[Any]]] | None = None
        self._now: dict[str, list[list[Any]]] = {}

    @classmethod
    def for_build(cls, feature_cache: Any, product: str, options: Any, tag: str) -> CoresetMemory | None:
        """The memory beside ``feature_cache`` (None without a cache) for ``product`` built with ``options``."""
        if feature_cache is None:
            return None
        record = {"product": product, **{name: getattr(options, name) for name in _OPTIONS}}
        key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]
        return cls(feature_cache.dir / SELECTIONS_SUBDIR / f"{key}.json", tag)

    def seeds(self, coreset: str, layout: RowLayout | None) -> np.ndarray | None:
        """The previous ``coreset`` picks still present, as rows of ``layout`` (None: none, or no layout)."""
        if layout is None:
            return None
        previous = self._load().get(coreset, [])
        try:
            rows = layout.rows(previous)
        except (TypeError, ValueError) as exc:
            log.warning("%s ignoring malformed coreset picks in %s (%s): full greedy", self.tag, self.path, exc)
            return None
        if previous:
            log.info("%s coreset (%s): warm start from %d of the previous build's %d picks",
                     self.tag, coreset, len(rows), len(previous))
        return rows if len(rows) else None

    def remember(self, coreset: str, layout: RowLayout | None, rows: np.ndarray) -> None:
        if layout is not None:
            self._now[coreset] = layout.picks(np.asarray(rows, dtype=np.int64))

    def save(self) -> None:
        """Write this build's picks atomically (nothing when a coreset had no layout); a failure only warns."""
        if not self._now:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, suffix=".tmp", delete=False) as handle:
                json.dump({"format": _FORMAT, "picks": self._now}, handle, separators=(",", ":"))
            os.replace(handle.name, self.path)
        except OSError as exc:
            log.warning("%s could not store the coreset picks in %s (%s); the next build runs the full greedy",
                        self.tag, self.path, exc)

    def _load(self) -> dict[str, list[list[Any]]]:
        if self._previous is None:
            self._previous = {}
            try:
                data = json.loads(self.path.read_text())
                if data.get("format") == _FORMAT and isinstance(data.get("picks"), dict):
                    self._previous = data["picks"]
                else:
                    log.warning("%s ignoring %s: not a coreset-picks file of this version", self.tag, self.path)
            except FileNotFoundError:
                log.info("%s no previous coreset picks (%s): full greedy", self.tag, self.path.name)
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("%s ignoring unreadable coreset picks %s (%s): full greedy", self.tag, self.path, exc)
        return self._previous


def layout_of(reservoir: Any, keys: Sequence[str | None], counts: Sequence[int]) -> RowLayout | None:
    """The row layout of ``reservoir`` filled with ``counts`` rows per image of ``keys`` (None if unknown)."""
    if reservoir.sampled or any(key is None for key in keys) or sum(counts) != reservoir.size:
        return None
    return RowLayout(keys, counts)  # type: ignore[arg-type]
