"""The release channel in object storage: the bucket protocol and its manifests.

Publishing with ``INSPECTION_PUBLISH_TARGETS`` = ``channel`` or ``both`` also puts every
version into the bucket, so serving hosts that do not run Airflow install the same
bytes. Layout under the channel prefix (default ``deployments/``)::

    <prefix><kind>/<name>/<version>/<file>                   every file of the version
    <prefix><kind>/<name>/<version>/.release-manifest.json   sha256 + size of every file; uploaded last
    <prefix><kind>/<name>/current.json                       the live version and its manifest's sha256
    <prefix><kind>/<name>/pin.json                           the pin of a rollback (as .pin.json locally)

``kind`` is ``clip`` (``name`` = ``normal``, ``defect``) or ``patchcore`` (``name`` = product code).

A version's objects never change once its manifest is there, and ``current.json`` is
written only after the manifest, so a reader that starts from ``current.json`` finds the
whole version it names: the old one or the new one, never a mix. A version prefix without
a manifest is an unfinished upload that nothing points to.

:class:`ReleaseChannel` is what :class:`~inspection_refresh.publish.Publisher` calls when
it has a channel (publish, rollback, pin, unpin). Serving hosts install from it with the
node agent (:mod:`inspection_refresh.agent`, ``inspection-publish pull``), which checks
every file against the manifest (:func:`verify_directory`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from inspection_refresh.publish import PublishError, check_name, cli_user
from inspection_refresh.storage import ObjectStorage, StorageError, error_code, is_transient

log = logging.getLogger(__name__)

KINDS = ("clip", "patchcore")
MANIFEST_NAME = ".release-manifest.json"
"""In each version prefix (last object uploaded), and in each version directory a node installed."""
POINTER_NAME = "current.json"
PIN_NAME = "pin.json"
FORMAT = 1
INCOMPLETE_GRACE = timedelta(hours=24)
"""A version prefix without a manifest this much older than its version id is a dead upload: pruned."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION_TIME = re.compile(r"^(\d{8}T\d{6})(\d{6})Z")
_MISSING = ("NoSuchKey", "404", "NotFound")


class ChannelError(PublishError):
    """The channel refuses an operation, or holds something a node must not install."""


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _actor(by: str | None, run_id: str | None) -> tuple[str, str | None]:
    """Who publishes: given, else the Airflow task's run (``AIRFLOW_CTX_*``), else the command-line user."""
    if by:
        return by, run_id
    dag_id, airflow_run = os.environ.get("AIRFLOW_CTX_DAG_ID"), os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")
    if airflow_run:
        return f"airflow:{dag_id}", run_id or airflow_run
    return cli_user(), run_id


def mb(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


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


class ReleaseChannel:
    """Versions of one kind of artefact in a bucket: upload, ``current.json``, pins, pruning.

    :param storage: the bucket (through an Airflow connection, or boto3's credential chain on a serving host).
    :param kind: ``clip`` or ``patchcore``.
    :param prefix: where the channel lives in the bucket (``deployments/``).
    :param keep: complete versions kept per name; never the current or the pinned one.
    """

    def __init__(self, storage: ObjectStorage, kind: str, prefix: str = "deployments/", keep: int = 5) -> None:
        if kind not in KINDS:
            raise ValueError(f"channel kind must be one of {KINDS}, not {kind!r}")
        self.storage = storage
        self.kind = kind
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.keep = max(1, keep)

    # -- keys -----------------------------------------------------------------------
    def name_prefix(self, name: str) -> str:
        return f"{self.prefix}{self.kind}/{check_name(name)}/"

    def version_prefix(self, name: str, version: str) -> str:
        return f"{self.name_prefix(name)}{check_name(version)}/"

    def manifest_key(self, name: str, version: str) -> str:
        return self.version_prefix(name, version) + MANIFEST_NAME

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
        data = (json.dumps(document, indent=2, default=str) + "\n").encode()
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
                                        and _SHA256.match(str(pointer.get("manifest_sha256")))):
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

    # -- publishing -----------------------------------------------------------------
    def publish(self, name: str, version: str, directory: str | os.PathLike, *, installed_at: str | os.PathLike | None = None,
                by: str | None = None, run_id: str | None = None) -> dict[str, Any]:
        """Upload ``directory`` as ``version`` of ``name``, move ``current.json`` to it, prune; returns the pointer.

        If moving the pointer fails, readers still see the old version; the uploaded one stays
        (the write may have landed after all) and is pruned like any other.
        """
        manifest = self.upload_version(name, version, directory, installed_at=installed_at, by=by, run_id=run_id)
        pointer = self._move_pointer(name, version, manifest, by=by, run_id=run_id, action="publish")
        try:
            self.prune(name)
        except (PublishError, StorageError) as exc:  # the version is out; the next publish prunes again
            log.warning("Could not prune old versions of %s from the channel: %s", self.label(name), exc)
        return pointer

    def make_current(self, name: str, version: str, directory: str | os.PathLike, *, by: str | None = None,
                     run_id: str | None = None, action: str = "rollback") -> dict[str, Any]:
        """Point ``current.json`` at ``version``; upload it from ``directory`` first if the channel lacks it
        (a version published before the channel was switched on)."""
        found = self.manifest(name, version)
        if found is None:
            if not Path(directory).is_dir():
                raise ChannelError(f"version {version} of {self.label(name)} is neither in the channel "
                                   f"({self.url(self.version_prefix(name, version))}) nor kept at {directory}")
            log.info("%s: version %s is not in the channel yet; uploading it from %s", self.label(name), version,
                     directory)
            manifest = self.upload_version(name, version, directory, by=by, run_id=run_id)
        else:
            manifest = found[0]
        return self._move_pointer(name, version, manifest, by=by, run_id=run_id, action=action)

    def upload_version(self, name: str, version: str, directory: str | os.PathLike, *,
                       installed_at: str | os.PathLike | None = None, by: str | None = None,
                       run_id: str | None = None) -> bytes:
        """Upload every file of ``directory`` under the version prefix, then its manifest; returns the manifest.

        A file whose sha256 and size equal a file of the current version is copied inside
        the bucket instead of uploaded, when that object still has the ETag the current
        manifest recorded (otherwise it is uploaded: a changed object is never copied).
        On failure the objects uploaded so far are removed (best effort); without a
        manifest they are invisible anyway.
        """
        directory = Path(directory)
        started = time.monotonic()
        files = {path.relative_to(directory).as_posix(): path
                 for path in sorted(directory.rglob("*")) if path.is_file()}
        files.pop(MANIFEST_NAME, None)  # a node's own record, not part of the artefact
        entries = {rel: {"sha256": file_sha256(path), "size": path.stat().st_size} for rel, path in files.items()}
        reusable = self._reusable(name)
        prefix = self.version_prefix(name, version)
        outcomes = parallel(lambda rel: self._put_file(files[rel], prefix + rel, entries[rel], reusable),
                             list(files), self.storage.max_transfers)
        failures = [(rel, error) for rel, _, error in outcomes if error is not None]
        if failures:
            self._remove_version(name, version, quiet=True)
            rel, error = failures[0]
            if isinstance(error, StorageError):
                raise error
            raise StorageError(f"uploading {files[rel]} to {self.url(prefix + rel)} failed: {error}",
                               transient=is_transient(error)) from error
        copied = 0
        for rel, (how, etag), _ in outcomes:
            entries[rel]["etag"] = etag
            copied += how == "copied"
        by, run_id = _actor(by, run_id)
        document = {"format": FORMAT, "kind": self.kind, "name": name, "version": version, "created_at": _now(),
                    "published_by": by, "run_id": run_id, "host": socket.gethostname(),
                    "installed_at": str(installed_at or directory), "count": len(entries),
                    "bytes": sum(e["size"] for e in entries.values()),
                    "files": {rel: entries[rel] for rel in sorted(entries)}}
        manifest = self._write_json(self.manifest_key(name, version), document)  # last: the version is complete
        log.info("Uploaded %s version %s to %s: %d files, %s (%d unchanged, copied in the bucket), %.1fs",
                 self.label(name), version, self.url(prefix), len(entries), mb(document["bytes"]), copied,
                 time.monotonic() - started)
        return manifest

    def _reusable(self, name: str) -> dict[tuple[str, int], tuple[str, str]]:
        """``(sha256, size) -> (key, etag)`` of the current version's objects, to copy instead of upload."""
        try:
            pointer = self.pointer(name)
            found = self.manifest(name, pointer["version"]) if pointer else None
        except ChannelError as exc:
            log.warning("Not reusing objects of the current %s version: %s", self.label(name), exc)
            return {}
        if not found:
            return {}
        prefix = self.version_prefix(name, pointer["version"])
        return {(entry["sha256"], entry["size"]): (prefix + rel, entry["etag"])
                for rel, entry in found[1]["files"].items() if entry.get("etag")}

    def _put_file(self, path: Path, key: str, entry: dict[str, Any],
                  reusable: dict[tuple[str, int], tuple[str, str]]) -> tuple[str, str]:
        """Copy (unchanged content) or upload one file; returns ``("copied"|"uploaded", etag)``."""
        client, bucket = self.storage.client, self.storage.bucket
        source = reusable.get((entry["sha256"], entry["size"]))
        if source is not None:
            source_key, etag = source
            try:
                head = self._head(source_key)
                if head and head["ETag"].strip('"') == etag and int(head["ContentLength"]) == entry["size"]:
                    copied = client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": source_key},
                                                CopySourceIfMatch=f'"{etag}"')
                    return "copied", copied["CopyObjectResult"]["ETag"].strip('"')
            except Exception as exc:  # e.g. larger than one CopyObject allows: upload it instead
                log.debug("Copying %s to %s failed (%s); uploading it", source_key, key, exc)
        self.storage.upload_file(path, key)
        head = self._head(key)
        if head is None or int(head["ContentLength"]) != entry["size"]:
            raise StorageError(f"{self.url(key)} has {head and head['ContentLength']} bytes after uploading "
                               f"{entry['size']} from {path}", transient=True)
        return "uploaded", head["ETag"].strip('"')

    def _move_pointer(self, name: str, version: str, manifest: bytes, *, by: str | None, run_id: str | None,
                      action: str) -> dict[str, Any]:
        previous = None
        try:
            old = self.pointer(name)
            previous = old["version"] if old else None
        except ChannelError as exc:
            log.warning("Replacing an unreadable pointer: %s", exc)
        by, run_id = _actor(by, run_id)
        parsed = parse_manifest(manifest, self.url(self.manifest_key(name, version)))
        pointer = {"format": FORMAT, "kind": self.kind, "name": name, "version": version,
                   "manifest_sha256": hashlib.sha256(manifest).hexdigest(), "files": parsed["count"],
                   "bytes": parsed["bytes"], "published_at": _now(), "published_by": by, "run_id": run_id,
                   "action": action, "previous": previous}
        self._write_json(self.name_prefix(name) + POINTER_NAME, pointer)
        log.info("%s: channel %s now points at version %s (was %s; %s by %s)", self.label(name),
                 self.url(self.name_prefix(name) + POINTER_NAME), version, previous, action, by)
        return pointer

    # -- pruning --------------------------------------------------------------------
    def prune(self, name: str) -> list[str]:
        """Remove the oldest complete versions beyond ``keep`` that are older than the current one and not
        pinned, and unfinished uploads older than :data:`INCOMPLETE_GRACE`; returns the versions removed."""
        pointer = self.pointer(name)
        live = pointer["version"] if pointer else None
        pin = self.read_pin(name)
        pinned = pin.get("version") if pin else None
        complete, incomplete = self._scan(name)
        older = [v for v in complete if v < live] if live in complete else complete
        doomed = [v for v in older if v != pinned][: max(0, len(complete) - self.keep)]
        cutoff = datetime.now(timezone.utc) - INCOMPLETE_GRACE
        for version in incomplete:
            match = _VERSION_TIME.match(version)
            if match and datetime.strptime(match.group(1) + match.group(2), "%Y%m%dT%H%M%S%f").replace(
                    tzinfo=timezone.utc) < cutoff:
                doomed.append(version)
        for version in doomed:
            self._remove_version(name, version)
            log.info("Pruned version %s of %s from the channel (keeping %d)", version, self.label(name), self.keep)
        return doomed

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


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """A manifest's content, checked: every file has a safe relative path, a sha256 and a size."""
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not an object")
        for rel, entry in files.items():
            if not (isinstance(entry, dict) and _SHA256.match(str(entry.get("sha256")))
                    and isinstance(entry.get("size"), int) and entry["size"] >= 0):
                raise ValueError(f"entry {rel!r} lacks a sha256 or a size")
            if rel == MANIFEST_NAME:
                raise ValueError(f"lists {MANIFEST_NAME} itself")
        manifest.setdefault("count", len(files))
        manifest.setdefault("bytes", sum(e["size"] for e in files.values()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ChannelError(f"{where} is not a valid release manifest ({exc})") from exc
    return manifest


def verify_directory(directory: Path, manifest: dict[str, Any], where: Callable[[str], str]) -> list[str]:
    """Problems of ``directory`` against ``manifest`` (each file's size and sha256; no file more or less)."""
    problems = []
    for rel, entry in sorted(manifest["files"].items()):
        path = directory / rel
        if not path.is_file():
            problems.append(f"{where(rel)} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{where(rel)} has {path.stat().st_size} bytes, the manifest says {entry['size']}")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{where(rel)} does not have the manifest's sha256 {entry['sha256']}")
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and rel not in manifest["files"]:
            problems.append(f"{where(rel)} is not in the manifest")
    return problems
