"""The release channel's place in the bucket: its keys, and its objects read and written one by one.

Layout under the channel prefix (default ``deployments/``)::

    <prefix><kind>/<name>/<version>/<file>                   every file of the version
    <prefix><kind>/<name>/<version>/.release-manifest.json   sha256 + size of every file; uploaded last
    <prefix><kind>/<name>/<version>/.release-manifest.sig    its Ed25519 signature (when signing is on); before it
    <prefix><kind>/<name>/current.json                       the live version and its manifest's sha256
    <prefix><kind>/<name>/pin.json                           the pin of a rollback (as .pin.json locally)

``kind`` is ``clip`` (``name`` = ``normal``, ``defect``) or ``patchcore`` (``name`` = product code).

:class:`ChannelBucket` reads what is there (pointer, manifests, complete versions, pins, a version's small
files) and writes or removes single objects; :class:`~inspection_refresh.channel.ReleaseChannel` builds
publishing, signing and pruning on it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from inspection_refresh.manifests import MANIFEST_NAME, SHA256, SIGNATURE_NAME, ChannelError, json_bytes, parse_manifest
from inspection_refresh.releases_dir import check_name
from inspection_refresh.storage import ObjectStorage, error_code

# The channel's logger: these lines are part of its publish and prune, and are filtered by that name.
log = logging.getLogger("inspection_refresh.channel")

KINDS = ("clip", "patchcore")
POINTER_NAME = "current.json"
PIN_NAME = "pin.json"
_MISSING = ("NoSuchKey", "404", "NotFound")


def parallel(function: Callable[[Any], Any], items: Iterable[Any], workers: int) -> list[tuple[Any, Any, BaseException | None]]:
    """``(item, result, error)`` of ``function(item)`` for each item, on ``workers`` threads.

    An exception in the calling thread (a task timeout, Ctrl-C) drops the queued calls
    instead of waiting for them.
    """
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="channel")
    outcomes = []
    try:
        futures = {pool.submit(function, item): item for item in items}
        for future in as_completed(futures):
            try:
                outcomes.append((futures[future], future.result(), None))
            except Exception as exc:
                outcomes.append((futures[future], None, exc))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return outcomes


class ChannelBucket:
    """The objects of one kind of artefact's channel in a bucket: keys, ``current.json``, manifests, pins.

    :param storage: the bucket (through an Airflow connection, or boto3's credential chain on a serving host).
    :param kind: ``clip`` or ``patchcore``.
    :param prefix: where the channel lives in the bucket (``deployments/``).
    """

    def __init__(self, storage: ObjectStorage, kind: str, prefix: str = "deployments/") -> None:
        if kind not in KINDS:
            raise ValueError(f"channel kind must be one of {KINDS}, not {kind!r}")
        self.storage = storage
        self.kind = kind
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    # -- keys -----------------------------------------------------------------------
    def name_prefix(self, name: str) -> str:
        return f"{self.prefix}{self.kind}/{check_name(name)}/"

    def version_prefix(self, name: str, version: str) -> str:
        return f"{self.name_prefix(name)}{check_name(version)}/"

    def manifest_key(self, name: str, version: str) -> str:
        return self.version_prefix(name, version) + MANIFEST_NAME

    def signature_key(self, name: str, version: str) -> str:
        return self.version_prefix(name, version) + SIGNATURE_NAME

    def url(self, key: str) -> str:
        return f"s3://{self.storage.bucket}/{key}"

    def label(self, name: str) -> str:
        """How operators name the artefact: ``clip:normal``, or the product code."""
        return f"clip:{name}" if self.kind == "clip" else name

    # -- small objects --------------------------------------------------------------
    def read(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` if there is no such object."""
        try:
            response = self.storage.client.get_object(Bucket=self.storage.bucket, Key=key)
            body = response["Body"]
            try:
                return body.read()
            finally:
                body.close()
        except Exception as exc:
            if error_code(exc) in _MISSING:
                return None
            raise self.storage.explain(exc, "reading", key) from exc

    def _read_json(self, key: str) -> dict[str, Any] | None:
        data = self.read(key)
        if data is None:
            return None
        try:
            document = json.loads(data)
            if not isinstance(document, dict):
                raise ValueError(f"a JSON {type(document).__name__}, not an object")
        except ValueError as exc:
            raise ChannelError(f"{self.url(key)} is not valid JSON ({exc})") from exc
        return document

    def _write_json(self, key: str, document: dict[str, Any]) -> bytes:
        return self._write_bytes(key, json_bytes(document))

    def _write_bytes(self, key: str, data: bytes) -> bytes:
        try:
            self.storage.client.put_object(Bucket=self.storage.bucket, Key=key, Body=data,
                                           ContentType="application/json")
        except Exception as exc:
            raise self.storage.explain(exc, "writing", key) from exc
        return data

    def _delete(self, key: str) -> None:
        self.storage.delete_file(key)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.storage.client.head_object(Bucket=self.storage.bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in _MISSING:
                return None
            raise self.storage.explain(exc, "checking", key) from exc

    def _subprefixes(self, prefix: str) -> list[str]:
        """The next path segment of every key under ``prefix`` (ListObjects V1 with a delimiter)."""
        found: list[str] = []
        try:
            paginator = self.storage.client.get_paginator("list_objects")
            for page in paginator.paginate(Bucket=self.storage.bucket, Prefix=prefix, Delimiter="/"):
                found += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        except Exception as exc:
            raise self.storage.explain(exc, f"listing prefix {prefix!r} in") from exc
        return sorted(found)

    # -- what is there --------------------------------------------------------------
    def pointer(self, name: str) -> dict[str, Any] | None:
        """``current.json`` of ``name`` (``version``, ``manifest_sha256``, ``published_at``, ...), or ``None``."""
        pointer = self._read_json(self.name_prefix(name) + POINTER_NAME)
        if pointer is not None and not (isinstance(pointer.get("version"), str)
                                        and SHA256.match(str(pointer.get("manifest_sha256")))):
            raise ChannelError(f"{self.url(self.name_prefix(name) + POINTER_NAME)} lacks a version or "
                               "a manifest_sha256")
        return pointer

    def manifest(self, name: str, version: str) -> tuple[bytes, dict[str, Any]] | None:
        """The manifest's bytes and content, or ``None`` when the version has none (not complete)."""
        key = self.manifest_key(name, version)
        data = self.read(key)
        if data is None:
            return None
        return data, parse_manifest(data, self.url(key))

    def names(self) -> list[str]:
        """Names of this kind with a ``current.json``."""
        base = f"{self.prefix}{self.kind}/"
        return [name for name in self._subprefixes(base)
                if self._head(f"{base}{name}/{POINTER_NAME}") is not None]

    def versions(self, name: str) -> list[str]:
        """Complete versions of ``name`` (with a manifest), oldest first."""
        return self._scan(name)[0]

    def _scan(self, name: str) -> tuple[list[str], list[str]]:
        complete, incomplete = [], []
        for version in self._subprefixes(self.name_prefix(name)):
            exists = self._head(self.manifest_key(name, version)) is not None
            (complete if exists else incomplete).append(version)
        return complete, incomplete

    # -- pins -----------------------------------------------------------------------
    def read_pin(self, name: str) -> dict[str, Any] | None:
        return self._read_json(self.name_prefix(name) + PIN_NAME)

    def write_pin(self, name: str, pin: dict[str, Any]) -> None:
        self._write_json(self.name_prefix(name) + PIN_NAME, pin)

    def remove_pin(self, name: str) -> dict[str, Any] | None:
        """Remove the channel's pin of ``name``; returns it (``None`` if there was none)."""
        try:
            pin = self.read_pin(name)
        except ChannelError as exc:
            pin = {"version": None, "unreadable": str(exc)}
        if pin is not None:
            self._delete(self.name_prefix(name) + PIN_NAME)
        return pin

    def _pointed_and_pinned(self, name: str) -> tuple[str | None, str | None]:
        """The versions ``current.json`` and ``pin.json`` name now (``None`` where there is none)."""
        pointer, pin = self.pointer(name), self.read_pin(name)
        return (pointer["version"] if pointer else None), (pin.get("version") if pin else None)

    # -- removing a version ---------------------------------------------------------
    def _remove_version(self, name: str, version: str, *, quiet: bool = False) -> None:
        """Delete a version prefix, its manifest first: a half-deleted version is never complete."""
        prefix = self.version_prefix(name, version)
        try:
            self._delete(prefix + MANIFEST_NAME)
            keys = [o.key for o in self.storage.list_objects(prefix, include_folders=True)]
            for _, _, error in parallel(self._delete, keys, self.storage.max_transfers):
                if error is not None:
                    raise error
        except Exception as exc:
            if not quiet:
                raise
            log.warning("Could not remove %s (%s); the next publish prunes it", self.url(prefix), exc)

    # -- a version's small files ----------------------------------------------------
    def read_version_file(self, name: str, version: str, relative_path: str) -> bytes | None:
        """One file of ``version`` of ``name`` (a card's ``bank_config.json``, ``tau.json``, an index's
        ``manifest.json``), or ``None`` if the channel has no such object.

        Read whole into memory: for the few small files a summary needs, never an index or a bank.
        Only the one object is read (no manifest, no listing), so a page of cards stays cheap.
        """
        parts = relative_path.split("/")
        if relative_path.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ChannelError(f"{relative_path!r} is not a path inside version {version} of {self.label(name)}")
        return self.read(self.version_prefix(name, version) + relative_path)
