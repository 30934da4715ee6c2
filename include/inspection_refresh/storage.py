"""NCP-safe access to S3-compatible object storage through Airflow's S3 hook.

NCP Object Storage speaks S3 with three quirks this module absorbs (CONTRACT.md):

* only ``ListObjects`` (V1, marker paging) works, so listing never uses V2;
* boto3 >= 1.36 adds CRC checksums that S3-compatible stores reject or mangle, so
  checksums are calculated/validated only ``when_required``;
* buckets are addressed path-style.

Those are defaults; the Airflow connection's ``extra.config_kwargs`` can override
any of them, and ``extra.endpoint_url`` / ``region_name`` point the hook at NCP.
Credentials come from the connection only.

:class:`ObjectStorage` offers the service's old ``ObjectStorageManager`` operations
(create_folder, upload_file, download_file, delete_file, list_objects, get_url)
and :meth:`ObjectStorage.sync_prefix`, a bounded-concurrency mirror of a prefix
into a local directory.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from inspection_refresh.config import get_settings
from inspection_refresh.files import write_json_atomic
from inspection_refresh.progress import Progress, counted

log = logging.getLogger(__name__)

NCP_SAFE_CLIENT_CONFIG: dict[str, Any] = {
    "s3": {"addressing_style": "path"},
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
    "retries": {"mode": "standard", "max_attempts": 3},
    "connect_timeout": 10,
    "read_timeout": 60,
}
"""botocore ``Config`` defaults for NCP; the connection's ``config_kwargs`` override them."""

SYNC_STATE_FILE = ".sync-state.json"
_PARTIAL_MARK = ".partial-"
_CHUNK = 1 << 20


class StorageError(RuntimeError):
    """An object-storage operation failed; the message names the bucket/key and a fix.

    ``transient`` says whether trying again later may succeed (network, throttling,
    5xx) or the operator must act (missing bucket, wrong credentials, bad key).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class UnsafeKeyError(StorageError):
    """An object key would land outside the target directory (``..``, absolute, ...)."""


class ObjectNotFoundError(StorageError):
    """The object does not exist (``NoSuchKey``); never transient."""


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None = field(default=None, compare=False)
    """When the object was last written, as the listing says (``None`` when not listed)."""

    @property
    def is_folder_marker(self) -> bool:
        """Zero-byte ``.../`` objects that the service's upload pages create as folders."""
        return self.key.endswith("/")


@dataclass
class SyncResult:
    """What :meth:`ObjectStorage.sync_prefix` did; small enough for XCom via :meth:`summary`."""

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


def is_safe_relative_key(relative: str) -> bool:
    """Whether ``relative`` (a key below a prefix) names a path inside a directory.

    Refused: empty, ``..``, ``.`` or empty segments, an absolute or Windows path
    (``/x``, ``\\``, ``C:``) and NUL bytes.
    """
    parts = relative.split("/")
    return not (
        not relative
        or relative.startswith("/")
        or "\\" in relative
        or "\x00" in relative
        or any(p in ("", ".", "..") for p in parts)
        or (len(parts[0]) >= 2 and parts[0][1] == ":")
    )


def local_path_for_key(key: str, prefix: str, local_dir: Path) -> Path:
    """Map ``prefix + relative`` to ``local_dir / relative``, refusing any escape.

    Object keys are untrusted: a key with ``..`` segments, an absolute or Windows
    path, a NUL byte or an empty segment raises :class:`UnsafeKeyError`.
    """
    if not key.startswith(prefix):
        raise UnsafeKeyError(f"object key {key!r} is not under prefix {prefix!r}")
    relative = key[len(prefix):]
    if not is_safe_relative_key(relative):
        raise UnsafeKeyError(
            f"refusing object key {key!r}: it would be written outside {local_dir} "
            "(keys must not contain '..', '.', empty or absolute segments); rename the object"
        )
    target = local_dir.joinpath(*PurePosixPath(relative).parts)
    base = local_dir.resolve()
    if not target.resolve().is_relative_to(base):  # e.g. through a symlinked sub-directory
        raise UnsafeKeyError(f"refusing object key {key!r}: it resolves outside {local_dir}")
    return target


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: dropped connections, truncated bodies, throttling, 5xx."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError, ReadTimeoutError
    from botocore.exceptions import ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, _TruncatedDownload):
        return True
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ReadTimeoutError,
                        ResponseStreamingError, Urllib3Error, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or _error_code(exc) in ("SlowDown", "RequestTimeout", "Throttling")
    return False


class _TruncatedDownload(IOError):
    pass


class DownloadCancelled(StorageError):
    """The sync that started this download was stopped (task timeout, error in the caller)."""


class ObjectStorage:
    """A small hook-like client for one bucket of S3-compatible storage.

    :param conn_id: Airflow connection id (type ``aws``); default from settings
        (``ncp_object_storage``).
    :param bucket: bucket name; default: the connection's
        ``extra.service_config.s3.bucket_name``, else ``INSPECTION_BUCKET``.
    :param max_transfers: concurrent transfers in :meth:`sync_prefix` (default 10).
    :param attempts: tries per object in :meth:`sync_prefix` and :meth:`download_file`.
    """

    def __init__(
        self,
        conn_id: str | None = None,
        bucket: str | None = None,
        *,
        max_transfers: int | None = None,
        attempts: int = 4,
        backoff_seconds: float = 0.5,
    ) -> None:
        settings = get_settings()
        self.conn_id = conn_id or settings.storage_conn_id
        self._bucket = bucket
        self._default_bucket = settings.bucket
        self.max_transfers = max(1, max_transfers or settings.max_transfers)
        self.attempts = max(1, attempts)
        self.backoff_seconds = backoff_seconds

    # -- connection -----------------------------------------------------------------
    @cached_property
    def hook(self):
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=self.conn_id)

    @cached_property
    def bucket(self) -> str:
        if self._bucket:
            return self._bucket
        configured = self.hook.conn_config.get_service_config("s3").get("bucket_name")
        return configured or self._default_bucket

    @cached_property
    def client(self):
        """One thread-safe boto3 client with NCP-safe defaults under the connection's overrides."""
        from botocore.config import Config

        overrides = self.hook.conn_config.botocore_config or Config()
        defaults = Config(**NCP_SAFE_CLIENT_CONFIG, max_pool_connections=max(10, self.max_transfers + 2))
        client = self.hook.get_client_type(config=defaults.merge(overrides))
        log.info(
            "Object storage: connection %r, endpoint %s, bucket %r",
            self.conn_id, client.meta.endpoint_url, self.bucket,
        )
        return client

    def _explain(self, exc: Exception, what: str, key: str | None = None) -> StorageError:
        """Turn a botocore error into a message an operator can act on."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        code = _error_code(exc)
        if isinstance(exc, NoCredentialsError):
            hint = f"no credentials: set the access key and secret key on Airflow connection {self.conn_id!r}"
        elif code == "NoSuchBucket" or (key is None and code in ("404", "NotFound")):
            hint = (f"bucket {self.bucket!r} does not exist: check INSPECTION_BUCKET or the bucket_name "
                    f"in connection {self.conn_id!r}")
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            hint = (f"the storage rejected the credentials ({code}): check the access key and secret key "
                    f"of Airflow connection {self.conn_id!r}")
        elif code in ("NoSuchKey", "404"):
            hint = "the object does not exist (deleted or renamed since it was listed?)"
        elif isinstance(exc, EndpointConnectionError):
            hint = f"cannot reach the storage endpoint: check endpoint_url of connection {self.conn_id!r}"
        elif isinstance(exc, ClientError):
            hint = f"{code or 'error'}: {exc}"
        else:
            hint = f"{type(exc).__name__}: {exc}"
        missing = key is not None and code in ("NoSuchKey", "404")
        error = ObjectNotFoundError if missing else StorageError
        return error(f"{what} {where} failed: {hint}", transient=_is_transient(exc))

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
            raise self._explain(exc, f"listing prefix {prefix!r} in") from exc

    def create_folder(self, prefix: str) -> str:
        """Create the zero-byte ``prefix/`` marker the service's pages use as a folder."""
        key = prefix if prefix.endswith("/") else prefix + "/"
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"")
        except Exception as exc:
            raise self._explain(exc, "creating folder", key) from exc
        return key

    def upload_file(self, local_path: str | os.PathLike, key: str, *, content_type: str | None = None) -> None:
        """Upload one local file to ``key``."""
        extra = {"ContentType": content_type} if content_type else None
        try:
            self.client.upload_file(str(local_path), self.bucket, key, ExtraArgs=extra)
        except Exception as exc:
            raise self._explain(exc, f"uploading {local_path} to", key) from exc

    def delete_file(self, key: str) -> None:
        """Delete ``key`` (no error if it is already gone, as in S3)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise self._explain(exc, "deleting", key) from exc

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
            raise self._explain(exc, "opening") from exc

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
                if attempt < self.attempts and _is_transient(exc):
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
                raise self._explain(exc, "downloading", key) from exc
        raise AssertionError("unreachable")

    def _download_once(
        self, key: str, target: Path, expected_size: int | None, cancel: threading.Event | None = None,
    ) -> int:
        partial = target.with_name(f".{target.name}{_PARTIAL_MARK}{uuid.uuid4().hex[:8]}")
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
                raise _TruncatedDownload(f"got {written} of {want} bytes")
            os.replace(partial, target)
            return written
        finally:
            partial.unlink(missing_ok=True)

    # -- sync ---------------------------------------------------------------------------
    def sync_prefix(
        self,
        prefix: str,
        local_dir: str | os.PathLike,
        *,
        accept: Callable[[ObjectInfo], str | None] | None = None,
        objects: list[ObjectInfo] | None = None,
        progress_interval: float = 5.0,
    ) -> SyncResult:
        """Mirror the objects under ``prefix`` into ``local_dir``.

        * Objects already present locally with the same size and ETag are skipped.
        * Local files whose objects are gone (or no longer accepted) are removed.
        * At most ``max_transfers`` downloads run at once; each retries transient
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
        listing = objects if objects is not None else list(self.list_objects(prefix))

        wanted, result.skipped = plan_mirror(listing, prefix, local_dir, accept)
        _log_skipped(result.skipped)

        # Remove what is no longer wanted (objects deleted upstream, files left by crashes).
        keep_paths = {path for _, path in wanted.values()}
        for path in sorted(local_dir.rglob("*")):
            if path.is_file() and path != state_path and path not in keep_paths:
                path.unlink()
                if _PARTIAL_MARK not in path.name:
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
            self.bucket, prefix, local_dir, counted(len(wanted), "object"), result.unchanged, len(to_fetch),
            total_bytes / 1e6, result.deleted, self.max_transfers,
        )
        progress = Progress(f"Downloading {prefix}", len(to_fetch), "files", total_bytes,
                            interval=progress_interval, logger=log)
        try:
            if to_fetch:
                self._fetch_all(to_fetch, result, progress)
                progress.finish()
        finally:
            # Also when a timeout interrupts the sync: what arrived is not fetched again by the retry.
            _write_state(state_path, {key: {"etag": result.etags[key], "size": wanted[key][0].size}
                                      for key in result.files})
        if len(result.failed) > 20:
            log.error("... and %d more downloads failed", len(result.failed) - 20)
        result.seconds = time.monotonic() - started
        return result

    def _fetch_all(self, to_fetch: list[tuple[ObjectInfo, Path]], result: SyncResult, progress: Progress) -> None:
        """Download ``to_fetch`` with ``max_transfers`` threads, recording each outcome in ``result``."""
        cancel = threading.Event()
        pool = ThreadPoolExecutor(self.max_transfers, thread_name_prefix="s3-sync")
        try:
            futures = {pool.submit(self.download_file, obj.key, path, expected_size=obj.size, cancel=cancel):
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
    """What :meth:`ObjectStorage.sync_prefix` mirrors from a listing, without touching anything.

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
