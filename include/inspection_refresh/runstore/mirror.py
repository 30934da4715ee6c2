"""Per-worker image mirrors: bring this worker's copy of a prefix to exactly the images a run listed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from inspection_refresh.progress import counted
from inspection_refresh.storage import ObjectInfo, ObjectStorage, SyncResult, UnsafeKeyError, plan_mirror


def materialise_images(
    storage: ObjectStorage, prefix: str, inventory: list[dict[str, Any]], mirror_dir: str | os.PathLike,
) -> SyncResult:
    """Bring this worker's mirror of ``prefix`` to exactly the images of a run's ``inventory``.

    ``inventory`` holds ``{"key", "etag", "size", ...}`` per image (what the run's ``download``
    listed; other fields, such as another worker's ``path``, are ignored). Through
    :meth:`ObjectStorage.sync_prefix` and its per-mirror ETag state: images this worker already has
    in that version are kept, missing or changed ones are downloaded, files the inventory does
    not list are removed. No LIST request is made. Returns the sync's result: ``files`` maps each
    key to its path on this worker; pass it to :func:`~inspection_refresh.storage.require_complete`.
    """
    try:
        objects = [ObjectInfo(key=item["key"], size=int(item["size"]), etag=str(item["etag"])) for item in inventory]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"an inventory entry lacks key, etag or size ({exc!r}); the run's download must record "
                         "all three for each image") from exc
    _, refused = plan_mirror(objects, prefix, Path(mirror_dir))
    if refused:  # before the sync touches the mirror
        raise UnsafeKeyError(f"{counted(len(refused), 'inventory key')} cannot be mirrored under {prefix!r}: "
                             f"{refused[0][1]}")
    return storage.sync_prefix(prefix, mirror_dir, objects=objects)
