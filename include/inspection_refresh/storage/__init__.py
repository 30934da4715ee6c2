"""NCP-safe access to S3-compatible object storage.

:class:`ObjectStorage` is the one public face: the service's old ``ObjectStorageManager``
operations and :meth:`ObjectStorage.sync_prefix`, a bounded, retried, atomic mirror of a
prefix into a local directory. Inside, one module a seam:

* :mod:`.errors`: what can fail and whether a retry helps;
* :mod:`.keys`: listed objects and untrusted keys → local paths (no escapes);
* :mod:`.sources`: where the boto3 client comes from (NCP-safe defaults, hints in the source's words);
* :mod:`.client`: the client itself (operations, retried atomic downloads);
* :mod:`.sync`: mirroring a prefix (plan, parallel transfers, state).

Nothing here imports Airflow: on Airflow hosts the client comes from an Airflow connection
(:mod:`inspection_refresh.compose`), elsewhere from boto3's credential chain.
"""

from inspection_refresh.storage.client import ObjectStorage
from inspection_refresh.storage.errors import (
    DownloadCancelled, ObjectNotFoundError, StorageError, UnsafeKeyError, error_code, is_transient,
)
from inspection_refresh.storage.keys import ObjectInfo, is_safe_relative_key, local_path_for_key
from inspection_refresh.storage.sources import NCP_SAFE_CLIENT_CONFIG, Boto3Source, ClientSource
from inspection_refresh.storage.sync import SYNC_STATE_FILE, SyncResult, plan_mirror, require_complete

__all__ = [
    "NCP_SAFE_CLIENT_CONFIG", "SYNC_STATE_FILE", "Boto3Source", "ClientSource", "DownloadCancelled",
    "ObjectInfo", "ObjectNotFoundError", "ObjectStorage", "StorageError", "SyncResult", "UnsafeKeyError",
    "error_code", "is_safe_relative_key", "is_transient", "local_path_for_key", "plan_mirror", "require_complete",
]
