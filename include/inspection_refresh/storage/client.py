"""The object-storage client: the service's old ``ObjectStorageManager`` operations
(create_folder, upload_file, download_file, delete_file, list_objects, get_url) over one
bucket, with NCP-safe defaults, retried atomic downloads and errors that say what to fix.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

from inspection_refresh.storage import sync
from inspection_refresh.storage.errors import (
    DownloadCancelled, ObjectNotFoundError, StorageError, TruncatedDownload, error_code, is_transient,
)
from inspection_refresh.storage.keys import ObjectInfo
from inspection_refresh.storage.sources import NCP_SAFE_CLIENT_CONFIG, ClientSource

log = logging.getLogger("inspection_refresh.storage")

_CHUNK = 1 << 20


class ObjectStorage:
    """A small hook-like client for one bucket of S3-compatible storage.

    :param source: where the boto3 client comes from (an Airflow connection on Airflow hosts,
        :class:`~inspection_refresh.storage.sources.Boto3Source` elsewhere).
    :param bucket: bucket name; default: the source's (an Airflow connection's
        ``extra.service_config.s3.bucket_name``), else ``default_bucket``.
    :param max_transfers: concurrent transfers in :meth:`sync_prefix`.
    :param attempts: tries per object in :meth:`sync_prefix` and :meth:`download_file`.
    """

    def __init__(
        self,
        source: ClientSource,
        bucket: str | None = None,
        *,
        default_bucket: str | None = None,
        max_transfers: int = 10,
        attempts: int = 4,
        backoff_seconds: float = 0.5,
    ) -> None:
        self.source = source
        self._bucket = bucket
        self._default_bucket = default_bucket
        self.max_transfers = max(1, max_transfers)
        self.attempts = max(1, attempts)
        self.backoff_seconds = backoff_seconds

    # -- connection -----------------------------------------------------------------
    @cached_property
    def bucket(self) -> str:
        bucket = self._bucket or self.source.configured_bucket() or self._default_bucket
        if not bucket:
            raise StorageError(f"no bucket: {self.source.label} names none and none was given")
        return bucket

    @cached_property
    def client(self):
        """One thread-safe boto3 client with NCP-safe defaults under the source's overrides."""
        from botocore.config import Config

        defaults = Config(**NCP_SAFE_CLIENT_CONFIG, max_pool_connections=max(10, self.max_transfers + 2))
        client = self.source.client(defaults)
        log.info("Object storage: %s, endpoint %s, bucket %r", self.source.label, client.meta.endpoint_url, self.bucket)
        return client

    def explain(self, exc: Exception, what: str, key: str | None = None) -> StorageError:
        """Turn a botocore error into a message an operator can act on (``what`` ``where`` failed: fix)."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        code = error_code(exc)
        if isinstance(exc, NoCredentialsError):
            hint = self.source.hint("no_credentials", bucket=self.bucket)
        elif code == "NoSuchBucket" or (key is None and code in ("404", "NotFound")):
            hint = self.source.hint("no_bucket", bucket=self.bucket, code=code)
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            hint = self.source.hint("rejected", bucket=self.bucket, code=code)
        elif code in ("NoSuchKey", "404"):
            hint = "the object does not exist (deleted or renamed since it was listed?)"
        elif isinstance(exc, EndpointConnectionError):
            hint = self.source.hint("unreachable", bucket=self.bucket)
        elif isinstance(exc, ClientError):
            hint = f"{code or 'error'}: {exc}"
        else:
            hint = f"{type(exc).__name__}: {exc}"
        missing = key is not None and code in ("NoSuchKey", "404")
        error = ObjectNotFoundError if missing else StorageError
        return error(f"{what} {where} failed: {hint}", transient=is_transient(exc))

    # -- the service's ObjectStorageManager operations -----------------------------
    def list_objects(
        self, prefix: str = "", *, include_folders: bool = False, page_size: int | None = None
    ) -> Iterator[ObjectInfo]:
        """Yield objects under ``prefix`` using ListObjects V1 (marker paging), as NCP requires.

        :param include_folders: also yield zero-byte ``.../`` folder markers.
        :param page_size: keys per LIST request (server default: 1000).
        """
        paginator = self.client.get_paginator("list_objects")
        paging = {"PageSize": page_size} if page_size else {}
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, PaginationConfig=paging):
                for item in page.get("Contents", []):
                    info = ObjectInfo(key=item["Key"], size=int(item["Size"]), etag=item["ETag"].strip('"'),
                                      last_modified=item.get("LastModified"))
                    if include_folders or not info.is_folder_marker:
                        yield info
        except Exception as exc:
            raise self.explain(exc, f"listing prefix {prefix!r} in") from exc

    def create_folder(self, prefix: str) -> str:
        """Create the zero-byte ``prefix/`` marker the service's pages use as a folder."""
        key = prefix if prefix.endswith("/") else prefix + "/"
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"")
        except Exception as exc:
            raise self.explain(exc, "creating folder", key) from exc
        return key

    def upload_file(self, local_path: str | os.PathLike, key: str, *, content_type: str | None = None) -> None:
        """Upload one local file to ``key``."""
        extra = {"ContentType": content_type} if content_type else None
        try:
            self.client.upload_file(str(local_path), self.bucket, key, ExtraArgs=extra)
        except Exception as exc:
            raise self.explain(exc, f"uploading {local_path} to", key) from exc

    def delete_file(self, key: str) -> None:
        """Delete ``key`` (no error if it is already gone, as in S3)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise self.explain(exc, "deleting", key) from exc

    def get_url(self, key: str, expires_in: int = 3600) -> str:
        """A presigned GET URL for ``key``, valid ``expires_in`` seconds."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
        )

    def storage_url(self, key: str) -> str:
        """The permanent (unsigned) URL of ``key``, as the service stores it in metadata."""
        return f"{self.client.meta.endpoint_url.rstrip('/')}/{self.bucket}/{key}"

    def check_access(self) -> None:
        """Fail fast with a clear message when the bucket is missing or credentials are wrong."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self.explain(exc, "opening") from exc

    def download_file(
        self,
        key: str,
        local_path: str | os.PathLike,
        *,
        expected_size: int | None = None,
        cancel: threading.Event | None = None,
    ) -> int:
        """Download ``key`` to ``local_path`` atomically, retrying transient errors.

        The body goes to a hidden ``.partial-`` file next to the target and is
        renamed into place only when complete, so a crash or a cut connection never
        leaves a half file under the final name. Returns the bytes written.

        :param cancel: once set, the download stops at the next chunk or retry
            with :class:`DownloadCancelled` (how a timed-out sync stops its transfers).
        """
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, self.attempts + 1):
            try:
                return self._download_once(key, target, expected_size, cancel)
            except Exception as exc:
                if attempt < self.attempts and is_transient(exc):
                    delay = self.backoff_seconds * 2 ** (attempt - 1) * (0.5 + random.random())
                    log.warning("Retrying %s in %.1fs (attempt %d/%d): %s",
                                key, delay, attempt + 1, self.attempts, exc)
                    if cancel is None:
                        time.sleep(delay)
                    elif cancel.wait(delay):
                        raise DownloadCancelled(f"download of {key} cancelled") from exc
                    continue
                if isinstance(exc, StorageError):
                    raise
                raise self.explain(exc, "downloading", key) from exc
        raise AssertionError("unreachable")

    def _download_once(
        self, key: str, target: Path, expected_size: int | None, cancel: threading.Event | None = None,
    ) -> int:
        partial = target.with_name(f".{target.name}{sync.PARTIAL_MARK}{uuid.uuid4().hex[:8]}")
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            length = int(response.get("ContentLength", -1))
            written = 0
            body = response["Body"]
            try:
                with open(partial, "wb") as out:
                    for chunk in body.iter_chunks(_CHUNK):
                        if cancel is not None and cancel.is_set():
                            raise DownloadCancelled(f"download of {key} cancelled")
                        out.write(chunk)
                        written += len(chunk)
            finally:
                body.close()
            want = expected_size if expected_size is not None else length
            if want >= 0 and written != want:
                raise TruncatedDownload(f"got {written} of {want} bytes")
            os.replace(partial, target)
            return written
        finally:
            partial.unlink(missing_ok=True)

    def sync_prefix(
        self,
        prefix: str,
        local_dir: str | os.PathLike,
        *,
        accept: Callable[[ObjectInfo], str | None] | None = None,
        objects: list[ObjectInfo] | None = None,
        progress_interval: float = 5.0,
    ) -> sync.SyncResult:
        """Mirror the objects under ``prefix`` into ``local_dir``: see :func:`.sync.sync_prefix`."""
        return sync.sync_prefix(self, prefix, local_dir, accept=accept, objects=objects,
                                progress_interval=progress_interval)
