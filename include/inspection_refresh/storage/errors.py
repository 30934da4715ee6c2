"""What can go wrong with object storage, and which of it a retry can fix."""

from __future__ import annotations


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


class DownloadCancelled(StorageError):
    """The sync that started this download was stopped (task timeout, error in the caller)."""


class TruncatedDownload(IOError):
    """A body ended before its announced length (a connection cut mid-body); worth a retry."""


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``SlowDown``, ...), else ``""``."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: dropped connections, truncated bodies, throttling, 5xx."""
    from botocore.exceptions import (
        ClientError, HTTPClientError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, TruncatedDownload):
        return True
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ReadTimeoutError,
                        ResponseStreamingError, Urllib3Error, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or error_code(exc) in ("SlowDown", "RequestTimeout", "Throttling")
    return False
