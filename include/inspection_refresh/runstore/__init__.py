"""A run's hand-over area: what one task of a run gives the next, on a local disk or in object storage.

XCom carries small dicts; everything else a task hands to the next task of its run (the image
inventory, ``vectors.npy``, stage records, a built bank or index version) goes through the run's
:class:`RunStore`. ``INSPECTION_RUN_STORE`` picks where it lives, once per run (:meth:`RunStore.for_run`):

* ``local`` (default, a single host): the run's work directory,
  ``<INSPECTION_CACHE_ROOT>/<pipeline>/runs/<run>/``; every task of the run must see that disk.
* ``storage``: object storage, ``<INSPECTION_RUN_STORE_PREFIX><pipeline>/<run>/<name>`` in the bucket,
  through :class:`~inspection_refresh.storage.ObjectStorage` (NCP-safe client, ListObjects V1), so each
  task of a run may run on another Celery worker with no shared disk.

Tasks never ask which: they keep their outputs and fetch their inputs through one interface
(:meth:`RunStore.writing` / :meth:`~RunStore.reading`, :meth:`~RunStore.keep_file`,
:meth:`~RunStore.keep_dir` / :meth:`~RunStore.fetch_dir`, :meth:`~RunStore.fetch_images`, ...), and the
backend object decides whether that means leaving a file where it is or moving it through the bucket.

Names are relative POSIX paths (``vectors.npy``, ``BRKT01/stage-download.json``); one that could leave
its run (``..``, an absolute path, empty segments) is refused with :class:`UnsafeNameError`. Every write
is atomic per file, and a directory (:meth:`RunStore.put_dir`) counts as present only once its manifest
is written, so a task killed half-way never hands a partial file or tree to the next one.

Image mirrors and the embedding cache stay per-worker caches: :func:`materialise_images` brings
this worker's mirror to exactly a run's inventory, downloading only what is missing or changed.

Inside, one module a seam: :mod:`.names` (errors, safe names and run ids), :mod:`.backends` (the two
backends, hand-over included), :mod:`.store` (:class:`RunStore`), :mod:`.mirror` (:func:`materialise_images`).
"""

from inspection_refresh.runstore.mirror import materialise_images
from inspection_refresh.runstore.names import (
    BACKENDS, DIR_MANIFEST, KEPT_AT, RunFileMissing, RunStoreError, UnsafeNameError, run_work_dir, safe_run_id,
)
from inspection_refresh.runstore.store import RunStore

__all__ = [
    "BACKENDS", "DIR_MANIFEST", "KEPT_AT", "RunFileMissing", "RunStore", "RunStoreError", "UnsafeNameError",
    "materialise_images", "run_work_dir", "safe_run_id",
]
