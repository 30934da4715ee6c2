"""Persistent embedding cache: one SQLite file per cache directory.

Rows are keyed by ``(model_identity, sha256 of the image file's bytes)`` and hold
the float32 vector as a BLOB, so a rerun over unchanged images decodes nothing,
a renamed or re-uploaded identical file is still a hit, and a different model,
checkpoint or preprocessing (a different identity, see
:func:`inspection_refresh.clip.weights.model_identity`) never reuses a vector.

Convention: ``EmbeddingCache(default_cache_dir(settings.cache_root))``, shared
by the ``normal`` and ``defect`` indexes (WAL mode and a busy timeout let two
tasks use it at once). The cache is disposable: a missing file is created, an
unreadable or corrupt one is moved aside with a warning and rebuilt, and
deleting the directory only costs a re-embed.

Only the standard library and numpy are imported here.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)

CACHE_FILE_NAME = "embeddings.sqlite3"
CACHE_SUBDIR = "clip_embeddings"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    model_identity TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (model_identity, sha256)
) WITHOUT ROWID
"""
_CHUNK = 500  # keys per SELECT (SQLite's variable limit is 32766; keep statements small)


_CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    return type(exc) is sqlite3.DatabaseError


def default_cache_dir(cache_root: str | os.PathLike[str]) -> Path:
    """``<cache_root>/clip_embeddings``: where the DAGs keep the CLIP embedding cache."""
    return Path(cache_root) / CACHE_SUBDIR


class EmbeddingCache:
    """Vectors by (model identity, image sha256) in ``<cache_dir>/embeddings.sqlite3``.

    Use from one thread; open one instance per process (tasks, not workers).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / CACHE_FILE_NAME
        self.timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._open()

    # -- connection management -------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.timeout)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            row = conn.execute("PRAGMA quick_check(1)").fetchone()
            if not row or row[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check says {row[0] if row else 'nothing'}")
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def _open(self) -> None:
        try:
            self._conn = self._connect()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc) and "quick_check" not in str(exc):
                raise
            self._discard(exc)
            self._conn = self._connect()

    def _discard(self, exc: BaseException) -> None:
        """Move a corrupt database aside (kept for inspection) and start empty."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        log.warning("embedding cache %s is unusable (%s); moving it to %s and starting empty", self.path, exc, moved)
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                try:
                    os.replace(src, Path(str(moved) + suffix))
                except OSError:
                    src.unlink(missing_ok=True)

    def _recover(self, exc: sqlite3.Error, doing: str) -> None:
        """Corruption: start an empty cache. Anything else (locked, I/O): warn and carry on uncached."""
        if _is_corruption(exc):
            self._discard(exc)
            self._conn = self._connect()
        else:
            log.warning("embedding cache %s: %s failed (%s); continuing without it for this call", self.path, doing, exc)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- API ---------------------------------------------------------------------
    def get_many(self, model_identity: str, sha256s: Iterable[str]) -> dict[str, np.ndarray]:
        """Known vectors (float32 ``[D]``) for these hashes under ``model_identity``; misses are absent.

        A corrupt database is replaced by an empty one (with a warning) and
        everything is a miss.
        """
        keys = list(dict.fromkeys(sha256s))
        found: dict[str, np.ndarray] = {}
        try:
            assert self._conn is not None
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT sha256, dim, vector FROM embeddings WHERE model_identity = ? AND sha256 IN ({marks})",
                    [model_identity, *chunk],
                )
                for sha, dim, blob in rows:
                    if len(blob) != dim * 4:
                        log.warning("embedding cache: ignoring malformed vector for %s", sha)
                        continue
                    found[sha] = np.frombuffer(blob, dtype=np.float32).copy()
        except sqlite3.Error as exc:
            self._recover(exc, "lookup")
            return {}
        return found

    def put_many(self, model_identity: str, items: Iterable[tuple[str, np.ndarray]]) -> int:
        """Store (or overwrite) ``(sha256, vector)`` pairs in one transaction; returns how many.

        A failed write (corrupt file, lock held past the timeout) is logged and
        skipped: the cache is an optimisation and never fails a run.
        """
        now = time.time()
        rows = []
        for sha, vec in items:
            v = np.ascontiguousarray(vec, dtype=np.float32).reshape(-1)
            rows.append((model_identity, sha, int(v.shape[0]), v.tobytes(), now))
        if not rows:
            return 0
        try:
            assert self._conn is not None
            with self._conn:
                self._conn.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:
            self._recover(exc, "store")
            return 0
        return len(rows)

    def count(self, model_identity: str | None = None) -> int:
        """Number of cached vectors (for one identity, or all)."""
        assert self._conn is not None
        if model_identity is None:
            return int(self._conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])
        return int(
            self._conn.execute("SELECT COUNT(*) FROM embeddings WHERE model_identity = ?", [model_identity]).fetchone()[0]
        )
