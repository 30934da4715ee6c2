"""Embed gallery images exactly as the service embeds its queries, reusing cached vectors.

Reader -> mapper -> vectors, in the clip-retrieval manner:

1. every file is read once and hashed (sha256 of its bytes);
2. the :class:`EmbeddingCache` answers the hashes it knows (those files are never
   decoded);
3. the misses, one file per distinct content, are decoded by DataLoader worker
   process(es) and encoded by model *lanes* (:mod:`.batched`). On CPU there is one
   single-threaded lane per core (see :func:`default_lanes` for why this beats one
   lane with every core's threads once decoding shares the cores); on a GPU, one lane;
4. new vectors go back into the cache batch by batch.

This module is the cache-aware orchestration and the planning (which files, which
batches, how many lanes and threads). The preprocessing is :mod:`.preprocess`, the
model :mod:`.model`; their names stay importable from here, as before the split.

Measured (``bench/bench_clip.py``, 650 JPEGs of 1200x900, ViT-B-32 fp32, 2
cores): the embed stage runs at about 92 % of the bare model's best throughput
on pre-decoded tensors, and faster than the bare model run the usual way (one
forward with both cores' threads).

Unreadable files (missing, empty, corrupt, not an image) are skipped, reported
in :attr:`EmbedResult.failures` and logged once each; they never stop a run.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from inspection_refresh.clip.batched import encode_batches
from inspection_refresh.clip.cache import EmbeddingCache
from inspection_refresh.clip.model import CLIPWeightsError, LoadedModel, load_model, resolve_device
from inspection_refresh.clip.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_SIZE,
    describe_preprocessing,
    load_resized,
    normalize_uint8,
    preprocess_image,
)
from inspection_refresh.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPWeightsError",
    "EmbedResult",
    "EmbeddingCache",
    "IMAGE_SIZE",
    "LoadedModel",
    "default_lanes",
    "default_num_threads",
    "describe_preprocessing",
    "embed_files",
    "embed_image",
    "load_model",
    "load_resized",
    "normalize_uint8",
    "preprocess_image",
    "resolve_device",
    "usable_cpus",
]

log = logging.getLogger(__name__)


def embed_image(path: str | os.PathLike[str], model: LoadedModel) -> "np.ndarray":
    """One file -> float32 unit vector ``[D]``; the reference (unbatched) path, as the service's query."""
    return model.encode(preprocess_image(path).unsqueeze(0))[0]


# ------------------------------------------------------------------------ planning


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` ignores cpusets/taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_num_threads(device: str, num_workers: int) -> int:
    """Intra-op threads for a single model lane: every usable core on CPU; 1 on a GPU."""
    if device.startswith("cuda"):
        return 1
    return usable_cpus()


def default_lanes(device: str) -> int:
    """Model lanes: one single-threaded lane per usable core on CPU, one lane on a GPU.

    On a few CPU cores, N lanes of 1 thread beat 1 lane of N threads once decoding
    shares the cores: a multi-threaded forward waits at every barrier for the
    thread that the decoder pre-empted (and spins while it waits), so each
    millisecond of decoding costs about two of model time. Single-threaded lanes
    have no barriers: decoding only takes the CPU time it really uses.
    """
    if device.startswith("cuda"):
        return 1
    return usable_cpus()


def _batches(n: int, batch_size: int, first: int = 8, lanes: int = 1) -> list[list[int]]:
    """Index batches for ``n`` images.

    Each lane's first batch is small (``first``) so the model starts after a few
    decodes, not a full batch. The last, partial round (with the round before it
    when the remainder is small) is split evenly across the lanes, so they
    finish together instead of one lane running a batch alone at the end.
    """
    lanes = max(1, lanes)
    sizes: list[int] = []
    rest = n
    for _ in range(lanes):
        if rest <= 0:
            break
        sizes.append(min(first, batch_size, rest))
        rest -= sizes[-1]
    round_size = batch_size * lanes
    full_rounds, tail = divmod(rest, round_size)
    if lanes > 1 and full_rounds and 0 < tail < round_size // 2:
        full_rounds, tail = full_rounds - 1, tail + round_size
    sizes += [batch_size] * (full_rounds * lanes)
    if tail:
        parts = min(lanes, tail)
        sizes += [tail // parts + (1 if i < tail % parts else 0) for i in range(parts)]
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def _hash_file(path: Path) -> tuple[str | None, int, str | None]:
    """``(sha256, size, None)`` or ``(None, 0, reason)`` for a file that cannot be read or is empty."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, 0, f"cannot read file: {exc.strerror or exc}"
    if not data:
        return None, 0, "empty file (0 bytes)"
    return hashlib.sha256(data).hexdigest(), len(data), None


# ------------------------------------------------------------------------- embedding


@dataclass
class EmbedResult:
    """What :func:`embed_files` made of its ``paths``.

    ``vectors[j]`` is the embedding of ``paths[ok_indices[j]]`` (ascending order);
    ``failures`` lists ``(index into paths, reason)`` of the files skipped.
    """

    vectors: "np.ndarray"
    ok_indices: list[int]
    failures: list[tuple[int, str]] = field(default_factory=list)
    embedded: int = 0
    """Distinct images run through the model in this call (identical files count once)."""
    cached: int = 0
    """Rows whose vector came from the cache (not decoded at all)."""
    seconds: float = 0.0
    images_per_second: float = 0.0
    """Images run through the model per second of the whole call (0 when all came from the cache)."""
    model_identity: str = ""

    def summary(self) -> dict:
        """Small JSON-able dict for logs, XCom and ``deployment_logs.result_data``."""
        return {
            "num_images": len(self.ok_indices),
            "embedding_dim": int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0,
            "embedded": self.embedded,
            "cached": self.cached,
            "failed": len(self.failures),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "model_identity": self.model_identity,
        }


def embed_files(
    paths: Sequence[str | os.PathLike[str]],
    model: LoadedModel,
    batch_size: int = 32,
    cache: EmbeddingCache | None = None,
    full_rebuild: bool = False,
    num_workers: int = 1,
    progress_label: str = "embed images",
    *,
    lanes: int | None = None,
    num_threads: int | None = None,
    prefetch_batches: int = 2,
    progress_interval: float = 5.0,
) -> EmbedResult:
    """Embed image files with ``model``, reusing ``cache`` for files whose bytes it has seen.

    Arguments:
        paths: image files; unreadable ones are skipped and reported, never fatal.
        model: from :func:`load_model`.
        batch_size: images per ``encode_image`` call.
        cache: persistent vectors keyed by (sha256 of file bytes, ``model.identity``);
            ``None`` embeds everything and stores nothing.
        full_rebuild: ignore cached vectors (recompute and overwrite them).
        num_workers: DataLoader worker processes that read, decode and resize while
            the model runs; ``0`` decodes in this thread, which still overlaps the
            model when it runs in lanes (PIL releases the GIL while decoding). A daemonic
            process (an Airflow task run by a Celery prefork worker) may not start child
            processes, so there it is always ``0``.
        progress_label: first words of the progress lines.
        lanes: model threads encoding different batches at once (default
            :func:`default_lanes`: one per core on CPU, each with one intra-op
            thread; 1 on a GPU).
        num_threads: ``torch.set_num_threads`` when there is a single lane
            (default :func:`default_num_threads`); restored afterwards.
        prefetch_batches: batches each worker prepares ahead.
        progress_interval: seconds between progress lines.

    Returns an :class:`EmbedResult`. Identical files (same bytes) are embedded once.
    """
    import numpy as np

    started = time.monotonic()
    paths = [Path(p) for p in paths]
    n = len(paths)

    # 1. read + hash every file (cheap next to decoding); empty/unreadable files fail here
    shas: list[str | None] = [None] * n
    failures: dict[int, str] = {}
    for i, p in enumerate(paths):
        sha, _size, why = _hash_file(p)
        if why:
            failures[i] = why
        shas[i] = sha

    # 2. cache lookup; the rest, one representative per distinct content, is to embed
    vectors: dict[str, np.ndarray] = {}
    if cache is not None and not full_rebuild:
        vectors.update(cache.get_many(model.identity, {s for s in shas if s}))
    to_embed: list[tuple[int, str]] = []
    seen: set[str] = set(vectors)
    for i, sha in enumerate(shas):
        if sha and sha not in seen:
            seen.add(sha)
            to_embed.append((i, str(paths[i])))
    n_cached_rows = sum(1 for s in shas if s and s in vectors)
    lanes = lanes or default_lanes(model.device)
    if num_workers > 0 and multiprocessing.current_process().daemon:
        log.info("Decoding in this process: it is daemonic (e.g. a Celery worker's task), which may not start "
                 "DataLoader worker processes")
        num_workers = 0
    log.info(
        "%s: %d files, %d from cache, %d distinct to embed, %d unreadable so far "
        "(model %s on %s, batch %d, %d decode worker(s), %d model lane(s))",
        progress_label, n, n_cached_rows, len(to_embed), len(failures), model.identity, model.device,
        batch_size, num_workers, lanes,
    )

    # 3. decode in the DataLoader (worker processes, or this thread), encode in model lanes
    embedded = 0
    if to_embed:
        threads = 1 if lanes > 1 else (num_threads or default_num_threads(model.device, num_workers))
        progress = Progress(progress_label, total=len(to_embed), unit="images", interval=progress_interval, logger=log)
        row_sha = {row: shas[row] for row, _ in to_embed}

        def collect(rows: list[int], out: np.ndarray) -> None:
            nonlocal embedded
            fresh = [(row_sha[row], out[j]) for j, row in enumerate(rows)]
            vectors.update(fresh)
            if cache is not None:
                cache.put_many(model.identity, fresh)
            embedded += len(rows)

        failures.update(encode_batches(
            to_embed, _batches(len(to_embed), batch_size, lanes=lanes), model, collect, progress,
            lanes=lanes, threads=threads, num_workers=num_workers, prefetch_batches=prefetch_batches,
        ))
        progress.finish()

    # 4. assemble rows in path order; a content that failed to decode fails for every copy
    bad_shas = {shas[i] for i in failures if shas[i]}
    for i, sha in enumerate(shas):
        if sha in bad_shas and i not in failures:
            failures[i] = failures[next(j for j in failures if shas[j] == sha)]
    ok = [i for i in range(n) if i not in failures and shas[i] in vectors]
    for i in sorted(failures):
        log.warning("%s: skipping %s: %s", progress_label, paths[i], failures[i])
    dim = model.embed_dim
    mat = np.stack([vectors[shas[i]] for i in ok]).astype(np.float32, copy=False) if ok else np.zeros((0, dim), np.float32)
    seconds = time.monotonic() - started
    fresh_shas = {shas[r] for r, _ in to_embed}
    cached_rows = sum(1 for i in ok if shas[i] not in fresh_shas)
    result = EmbedResult(
        vectors=mat,
        ok_indices=ok,
        failures=sorted(failures.items()),
        embedded=embedded,
        cached=cached_rows,
        seconds=seconds,
        images_per_second=(embedded / seconds) if embedded else 0.0,
        model_identity=model.identity,
    )
    log.info(
        "%s: %d vectors (%d embedded now, %d reused), %d skipped, %.1fs",
        progress_label, len(ok), embedded, cached_rows, len(failures), seconds,
    )
    return result
