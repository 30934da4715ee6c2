"""The CLIP index pipeline as plain functions: download -> embed -> index_save -> (approve) -> publish -> register.

Each function is one Airflow task of ``clip_index_normal`` / ``clip_index_defect``
and can be called without a scheduler. They hand each other small dicts (XCom);
bulk data (the image inventory, vectors, stage records, the built version) goes
through the run's :class:`~inspection_refresh.runstore.RunStore`: the run's work
directory (``INSPECTION_RUN_STORE=local``, one host) or object storage (``storage``:
each task may run on another worker). The tasks keep and fetch it through the store's
one interface and never ask which backend it is. Images stay in each worker's own
mirror: a task that needs them asks the store for them
(:meth:`~inspection_refresh.runstore.RunStore.fetch_images`).
``index_save`` writes and verifies the new version in a staging directory, the
``approve`` task (``operators.PublishApproval``, shown :func:`approval_request`)
lets a person approve or reject it when the run requires that, and ``publish``
makes the staged version live (with the ``storage`` store it first rebuilds the
staging directory on its own worker from the stored version and its own mirror).

This package is the DAG's one face (``from inspection_refresh.tasks import clip_index as pipeline``);
inside, one module a part of the run: :mod:`.run` (the run and what several steps ask), :mod:`.build`
(download, embed, index_save) and :mod:`.publishing` (approval summary, publish, register).
"""

from inspection_refresh.tasks.clip_index.build import download, embed, index_save
from inspection_refresh.tasks.clip_index.publishing import (
    approval_request, discard_unpublished, publish, published_message, register,
)
from inspection_refresh.tasks.clip_index.quality import quality_check
from inspection_refresh.tasks.clip_index.run import (
    DEPLOY_TYPE, INDEX_TYPES, PIPELINE, STAGES, VERSION_DIR, ClipRun, local_images, published_manifest,
    source_fingerprint, unchanged_live_index,
)

__all__ = [
    "DEPLOY_TYPE", "INDEX_TYPES", "PIPELINE", "STAGES", "VERSION_DIR", "ClipRun", "approval_request",
    "discard_unpublished", "download", "embed", "index_save", "local_images", "publish", "published_manifest",
    "published_message", "quality_check", "register", "source_fingerprint", "unchanged_live_index",
]
