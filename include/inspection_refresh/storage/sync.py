"""Mirroring a prefix into a local directory: plan, bounded parallel downloads, state.

:meth:`inspection_refresh.storage.ObjectStorage.sync_prefix` is the public face; this module
holds the work so the client stays a thin wrapper around boto3 calls.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from inspection_refresh.files import write_json_atomic
from inspection_refresh.progress import Progress, counted
from inspection_refresh.storage.errors import StorageError, UnsafeKeyError
from inspection_refresh.storage.keys import ObjectInfo, local_path_for_key

log = logging.getLogger("inspection_refresh.storage")

SYNC_STATE_FILE = ".sync-state.json"
PARTIAL_MARK = ".partial-"
"""Marks a download in progress (``.<name>.partial-<id>``); such files are never results."""


class Transfers(Protocol):
    """What a sync needs of a storage client (:class:`~inspection_refresh.storage.ObjectStorage`)."""

    bucket: str
    max_transfers: int

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def download_file(self, key: str, local_path: str | os.PathLike, *, expected_size: int | None = None,
                      cancel: threading.Event | None = None) -> int: ...


@dataclass
class SyncResult:
    """What :func:`sync_prefix` did; small enough for XCom via :meth:`summary`."""

    prefix: str
    local_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    """key -> local path of every object now mirrored (downloaded or unchanged)."""
    etags: dict[str, str] = field(default_factory=dict)
    downloaded: int = 0
    unchanged: int = 0
    deleted: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(key, reason) for objects deliberately not mirrored (folder markers excluded)."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(key, reason) for objects that could not be downloaded after retries."""

    def summary(self) -> dict[str, Any]:
        """Counts and lists; ``num_skipped``/``num_failed`` stay exact when a caller shortens the lists."""
        return {
            "prefix": self.prefix,
            "local_dir": str(self.local_dir),
            "files": len(self.files),
            "downloaded": self.downloaded,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "mb_downloaded": round(self.bytes_downloaded / 1e6, 3),
            "seconds": round(self.seconds, 3),
            "skipped": [list(s) for s in self.skipped],
            "failed": [list(f) for f in self.failed],
            "num_skipped": len(self.skipped),
            "num_failed": len(self.failed),
        }


def require_complete(*results: SyncResult, allowed_missing: int = 0, hint: str = "") -> list[str]:
    """Return the keys the syncs could not download; raise if more than ``allowed_missing`` are.

    The :class:`StorageError` is transient and names the objects: the task is
    retried, and its retry downloads only what is still missing. ``hint`` ends
    the message (e.g. how to publish without the missing objects).
    """
    failed = [failure for result in results for failure in result.failed]
    if len(failed) > allowed_missing:
        keys = [key for key, _ in failed]
        raise StorageError(
            f"{len(failed)} object(s) could not be downloaded after every retry (allowed missing: "
            f"{allowed_missing}): {', '.join(keys[:10])}{f' and {len(keys) - 10} more' if len(keys) > 10 else ''} "
            f"(first error: {failed[0][1]}). {hint}".rstrip(),
            transient=True,
        )
    return [key for key, _ in failed]


def sync_prefix(
    storage: Transfers,
    prefix: str,
    local_dir: str | os.PathLike,
    *,
    accept: Callable[[ObjectInfo], str | None] | None = None,
    objects: list[ObjectInfo] | None = None,
    progress_interval: float = 5.0,
) -> SyncResult:
    """Mirror the objects under ``prefix`` of ``storage`` into ``local_dir``.

    * Objects already present locally with the same size and ETag are skipped.
    * Local files whose objects are gone (or no longer accepted) are removed.
    * At most ``storage.max_transfers`` downloads run at once; each retries transient
      errors (including a connection cut mid-body) with exponential backoff.
    * An object that still fails is reported in :attr:`SyncResult.failed` and its
      older local copy, if any, is removed: the mirror never passes an old file off
      as current. :func:`require_complete` turns failures into an error.
    * An exception in the calling thread (a task timeout) cancels the queued
      downloads and stops the running ones instead of waiting for them.
    * Keys that would escape ``local_dir`` are refused and reported.

    :param accept: returns ``None`` to mirror an object, or a reason to skip it
        (logged once, reported in :attr:`SyncResult.skipped`).
    :param objects: a listing already made (saves a second LIST round).
    """
    started = time.monotonic()
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    state_path = local_dir / SYNC_STATE_FILE
    state = _read_state(state_path)
    result = SyncResult(prefix=prefix, local_dir=local_dir)
    listing = objects if objects is not None else list(storage.list_objects(prefix))

    wanted, result.skipped = plan_mirror(listing, prefix, local_dir, accept)
    _log_skipped(result.skipped)

    # Remove what is no longer wanted (objects deleted upstream, files left by crashes).
    keep_paths = {path for _, path in wanted.values()}
    for path in sorted(local_dir.rglob("*")):
        if path.is_file() and path != state_path and path not in keep_paths:
            path.unlink()
            if PARTIAL_MARK not in path.name:
                result.deleted += 1
    _prune_empty_dirs(local_dir)

    to_fetch: list[tuple[ObjectInfo, Path]] = []
    for key, (obj, path) in wanted.items():
        known = state.get(key)
        if known and known.get("etag") == obj.etag and path.is_file() and path.stat().st_size == obj.size:
            result.unchanged += 1
            result.files[key] = path
            result.etags[key] = obj.etag
        else:
            to_fetch.append((obj, path))

    total_bytes = sum(obj.size for obj, _ in to_fetch)
    log.info(
        "Sync s3://%s/%s -> %s: %s, %d unchanged, %d to download (%.1f MB), %d removed locally, "
        "%d transfers at once",
        storage.bucket, prefix, local_dir, counted(len(wanted), "object"), result.unchanged, len(to_fetch),
        total_bytes / 1e6, result.deleted, storage.max_transfers,
    )
    progress = Progress(f"Downloading {prefix}", len(to_fetch), "files", total_bytes,
                        interval=progress_interval, logger=log)
    try:
        if to_fetch:
            _fetch_all(storage, to_fetch, result, progress)
            progress.finish()
    finally:
        # Also when a timeout interrupts the sync: what arrived is not fetched again by the retry.
        _write_state(state_path, {key: {"etag": result.etags[key], "size": wanted[key][0].size}
                                  for key in result.files})
    if len(result.failed) > 20:
        log.error("... and %d more downloads failed", len(result.failed) - 20)
    result.seconds = time.monotonic() - started
    return result


def _fetch_all(storage: Transfers, to_fetch: list[tuple[ObjectInfo, Path]], result: SyncResult, progress: Progress) -> None:
    """Download ``to_fetch`` with ``storage.max_transfers`` threads, recording each outcome in ``result``."""
    cancel = threading.Event()
    pool = ThreadPoolExecutor(storage.max_transfers, thread_name_prefix="s3-sync")
    try:
        futures = {pool.submit(storage.download_file, obj.key, path, expected_size=obj.size, cancel=cancel):
                   (obj, path) for obj, path in to_fetch}
        for future in as_completed(futures):
            obj, path = futures[future]
            try:
                nbytes = future.result()
            except Exception as exc:
                # The file there (if any) is an older version of the object: it must not pass for current.
                path.unlink(missing_ok=True)
                result.failed.append((obj.key, str(exc)))
                if len(result.failed) <= 20:
                    log.error("Could not download %s: %s", obj.key, exc)
                progress.update(1)
                continue
            result.downloaded += 1
            result.bytes_downloaded += nbytes
            result.files[obj.key] = path
            result.etags[obj.key] = obj.etag
            progress.update(1, nbytes)
    except BaseException:
        # AirflowTaskTimeout (or any error) arrives in this waiting thread: drop the queued transfers
        # and stop the running ones instead of letting the executor's exit wait for all of them.
        cancel.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def plan_mirror(
    objects: Iterable[ObjectInfo],
    prefix: str,
    local_dir: Path,
    accept: Callable[[ObjectInfo], str | None] | None = None,
) -> tuple[dict[str, tuple[ObjectInfo, Path]], list[tuple[str, str]]]:
    """What :func:`sync_prefix` mirrors from a listing, without touching anything.

    Returns ``(wanted, skipped)``: key -> (object, local path) for each object to
    mirror, and (key, reason) for each refused by ``accept`` or for an unsafe key.
    Folder markers are in neither.
    """
    wanted: dict[str, tuple[ObjectInfo, Path]] = {}
    skipped: list[tuple[str, str]] = []
    for obj in objects:
        if obj.is_folder_marker:
            continue
        reason = accept(obj) if accept else None
        if reason is None:
            try:
                wanted[obj.key] = (obj, local_path_for_key(obj.key, prefix, local_dir))
                continue
            except UnsafeKeyError as exc:
                reason = str(exc)
        skipped.append((obj.key, reason))
    return wanted, skipped


def _read_state(path: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("Ignoring unreadable sync state %s; every object will be re-checked by download", path)
        return {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    write_json_atomic(path, state, indent=None, fsync=False)


def _prune_empty_dirs(root: Path) -> None:
    for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            directory.rmdir()
        except OSError:
            pass


def _log_skipped(skipped: list[tuple[str, str]], limit: int = 20) -> None:
    for key, reason in skipped[:limit]:
        log.warning("Skipping %s: %s", key, reason)
    if len(skipped) > limit:
        # the deployment record keeps the exact count and the first cap_list() keys, not every key
        log.warning("... and %s skipped (see the deployment record)",
                    counted(len(skipped) - limit, "more object", "more objects"))
