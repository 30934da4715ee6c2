"""The release channel in object storage, and the node agent that installs from it.

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
it has a channel (publish, rollback, pin, unpin). :class:`NodeAgent` is
``inspection-publish pull``: it reads ``current.json``, downloads a new version into a
staging directory, checks every file's size and sha256 against the manifest (and the
manifest against the pointer), and swaps it in with the same atomic local Publisher;
anything missing or altered is refused and the node keeps its version.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from inspection_refresh.config import get_settings
from inspection_refresh.files import link_or_copy
from inspection_refresh.publish import Publisher, PublishError, _cli_user, check_name, default_releases_dir
from inspection_refresh.storage import (
    NCP_SAFE_CLIENT_CONFIG, ObjectStorage, StorageError, UnsafeKeyError, _error_code, _is_transient,
    local_path_for_key,
)

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
    return _cli_user(), run_id


def _mb(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _parallel(function: Callable[[Any], Any], items: Iterable[Any], workers: int) -> list[tuple[Any, Any, BaseException | None]]:
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

    :param storage: the bucket (through Airflow's connection, or :class:`StandaloneStorage`).
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
            if _error_code(exc) in _MISSING:
                return None
            raise self.storage._explain(exc, "reading", key) from exc

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
            raise self.storage._explain(exc, "writing", key) from exc
        return data

    def _delete(self, key: str) -> None:
        self.storage.delete_file(key)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.storage.client.head_object(Bucket=self.storage.bucket, Key=key)
        except Exception as exc:
            if _error_code(exc) in _MISSING:
                return None
            raise self.storage._explain(exc, "checking", key) from exc

    def _subprefixes(self, prefix: str) -> list[str]:
        """The next path segment of every key under ``prefix`` (ListObjects V1 with a delimiter)."""
        found: list[str] = []
        try:
            paginator = self.storage.client.get_paginator("list_objects")
            for page in paginator.paginate(Bucket=self.storage.bucket, Prefix=prefix, Delimiter="/"):
                found += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        except Exception as exc:
            raise self.storage._explain(exc, f"listing prefix {prefix!r} in") from exc
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
        outcomes = _parallel(lambda rel: self._put_file(files[rel], prefix + rel, entries[rel], reusable),
                             list(files), self.storage.max_transfers)
        failures = [(rel, error) for rel, _, error in outcomes if error is not None]
        if failures:
            self._remove_version(name, version, quiet=True)
            rel, error = failures[0]
            if isinstance(error, StorageError):
                raise error
            raise StorageError(f"uploading {files[rel]} to {self.url(prefix + rel)} failed: {error}",
                               transient=_is_transient(error)) from error
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
                 self.label(name), version, self.url(prefix), len(entries), _mb(document["bytes"]), copied,
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
            for _, _, error in _parallel(self._delete, keys, self.storage.max_transfers):
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


# ---------------------------------------------------------------------------------- storage without Airflow


class StandaloneStorage(ObjectStorage):
    """:class:`ObjectStorage` for hosts without Airflow: boto3's own credential chain.

    Credentials: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (NCP's access key and
    secret key), a profile (``profile`` or ``AWS_PROFILE``), or anything else boto3 finds.
    ``endpoint_url`` (else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) points it at NCP;
    the region is ``region_name``, else the environment's or profile's, else ``kr-standard``.
    The client gets the same NCP defaults as the Airflow one (:data:`NCP_SAFE_CLIENT_CONFIG`).
    """

    DEFAULT_REGION = "kr-standard"

    def __init__(self, bucket: str, *, endpoint_url: str | None = None, region_name: str | None = None,
                 profile: str | None = None, max_transfers: int | None = None) -> None:
        super().__init__(conn_id="-", bucket=bucket, max_transfers=max_transfers)
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self.profile = profile

    @cached_property
    def bucket(self) -> str:
        return self._bucket

    @cached_property
    def client(self):
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(profile_name=self.profile)
        config = Config(**NCP_SAFE_CLIENT_CONFIG, max_pool_connections=max(10, self.max_transfers + 2))
        client = session.client("s3", endpoint_url=self.endpoint_url, config=config,
                                region_name=self.region_name or session.region_name or self.DEFAULT_REGION)
        log.debug("Object storage: endpoint %s, bucket %r", client.meta.endpoint_url, self.bucket)
        return client

    def _explain(self, exc: Exception, what: str, key: str | None = None) -> StorageError:
        """As :meth:`ObjectStorage._explain`, with hints about this host's settings instead of a connection."""
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError

        code = _error_code(exc)
        if isinstance(exc, NoCredentialsError):
            hint = "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or --profile"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            hint = f"the storage rejected the credentials ({code}): check the access key, secret key and --region"
        elif code == "NoSuchBucket":
            hint = f"bucket {self.bucket!r} does not exist: check --bucket"
        elif isinstance(exc, EndpointConnectionError):
            hint = "cannot reach the storage endpoint: check --endpoint-url (or AWS_ENDPOINT_URL)"
        else:
            return super()._explain(exc, what, key)
        where = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        return StorageError(f"{what} {where} failed: {hint}", transient=_is_transient(exc))


# ---------------------------------------------------------------------------------- the node agent


@dataclass
class Change:
    """One artefact a pull swapped to another version."""

    label: str
    old: str | None
    new: str
    files: int
    size: int
    downloaded: int

    def line(self, reload: str | None) -> str:
        fetched = ("" if self.downloaded == self.size else " (nothing downloaded)" if not self.downloaded
                   else f" ({_mb(self.downloaded)} downloaded)")
        return (f"{self.label}: {self.old or 'none'} -> {self.new}, {self.files} files, {_mb(self.size)}{fetched}, "
                f"verified" + (f", {reload}" if reload else ""))


class NodeAgent:
    """Keeps a serving host's roots at the channel's current versions (``inspection-publish pull``).

    :param channels: one :class:`ReleaseChannel` per kind (``clip``, ``patchcore``).
    :param publishers: the node's local :class:`Publisher` per kind (its roots, ``keep``).
    :param reload_url: POSTed (JSON ``{"artefacts": [...]}``) after a pull swapped something.
    :param reload_command: run without a shell after a pull swapped something, with
        ``INSPECTION_PULLED`` = the artefacts swapped (space-separated).
    """

    def __init__(self, channels: dict[str, ReleaseChannel], publishers: dict[str, Publisher], *,
                 reload_url: str | None = None, reload_command: str | None = None,
                 reload_timeout: float = 60.0) -> None:
        self.channels = channels
        self.publishers = publishers
        self.reload_url = reload_url
        self.reload_command = shlex.split(reload_command) if reload_command else None
        self.reload_timeout = reload_timeout
        self._reported: dict[str, str] = {}
        self._warned_paths: set[str] = set()

    def resolve(self, artefacts: list[str]) -> list[tuple[str, str]]:
        """``(kind, name)`` for ``clip:normal``, ``patchcore:BRKT01`` or ``BRKT01``; none given: all in the channel."""
        if not artefacts:
            return [(kind, name) for kind, channel in self.channels.items() for name in channel.names()]
        chosen = []
        for artefact in artefacts:
            kind, _, name = artefact.rpartition(":")
            kind = kind or "patchcore"
            if kind not in KINDS:
                raise ChannelError(f"unknown artefact {artefact!r}: use clip:<index type>, patchcore:<product code> "
                                   "or a product code")
            chosen.append((kind, check_name(name)))
        return chosen

    def pull_once(self, artefacts: list[str] | None = None) -> int:
        """Install every chosen artefact's current version; one log line per change. Returns the exit code."""
        try:
            targets = self.resolve(list(artefacts or []))
        except (PublishError, StorageError) as exc:
            log.error("%s", exc)
            return 1
        changes: list[Change] = []
        failed = False
        for kind, name in targets:
            label = self.channels[kind].label(name)
            try:
                change = self.pull(kind, name)
            except (PublishError, StorageError, OSError) as exc:
                failed = True
                message = f"{label}: {exc}; version {self.publishers[kind].current(name) or 'none'} stays live"
                if self._reported.get(label) != message:  # --watch: say it again only when it changes
                    log.error("%s", message)
                self._reported[label] = message
                continue
            if self._reported.pop(label, None):
                log.info("%s: the channel is installable again", label)
            if change:
                changes.append(change)
        reload = self.reload([c.label for c in changes]) if changes else None
        for change in changes:
            log.info("%s", change.line(reload))
        return 1 if failed or (reload or "").startswith("reload failed") else 0

    def pull(self, kind: str, name: str) -> Change | None:
        """Make the channel's current version of ``name`` live here; ``None`` when it already is."""
        channel, publisher = self.channels[kind], self.publishers[kind]
        pointer = channel.pointer(name)
        if pointer is None:
            raise ChannelError(f"nothing published: {channel.url(channel.name_prefix(name) + POINTER_NAME)} "
                               "does not exist")
        version = check_name(pointer["version"])
        if version == publisher.current(name):
            return None
        with self._lock(publisher):
            return self._pull_version(channel, publisher, name, version, pointer)

    def _pull_version(self, channel: ReleaseChannel, publisher: Publisher, name: str, version: str,
                      pointer: dict[str, Any]) -> Change | None:
        label, live = channel.label(name), publisher.current(name)
        if version == live:  # another pull installed it while we waited for the lock
            return None
        key = channel.manifest_key(name, version)
        data = channel.read(key)
        if data is None:
            raise ChannelError(f"refused version {version}: its manifest {channel.url(key)} is missing")
        digest = hashlib.sha256(data).hexdigest()
        if digest != pointer["manifest_sha256"]:
            raise ChannelError(f"refused version {version}: {channel.url(key)} has sha256 {digest}, but "
                               f"{POINTER_NAME} says {pointer['manifest_sha256']} (altered after publishing)")
        manifest = parse_manifest(data, channel.url(key))
        self._warn_about_paths(channel.kind, name, version, manifest, publisher)
        kept = publisher.releases / name / version
        if version in publisher.versions(name):  # e.g. the channel rolled back: no download needed
            problems = verify_directory(kept, manifest, lambda rel: f"{kept / rel}")
            if not problems:
                publisher.rollback(name, version)
                return Change(label, live, version, manifest["count"], manifest["bytes"], 0)
            log.warning("%s: the kept copy of version %s is damaged (%s); downloading it again", label, version,
                        problems[0])
            shutil.rmtree(kept)
        downloaded = self._install(channel, publisher, name, version, manifest, data)
        return Change(label, live, version, manifest["count"], manifest["bytes"], downloaded)

    def _install(self, channel: ReleaseChannel, publisher: Publisher, name: str, version: str,
                 manifest: dict[str, Any], manifest_data: bytes) -> int:
        """Download and verify ``version`` into a staging directory, then publish it; returns bytes downloaded."""
        prefix = channel.version_prefix(name, version)
        same = self._files_of_live_version(publisher, name)
        staging = publisher.stage(name)
        try:
            def fetch(rel: str) -> int:
                entry = manifest["files"][rel]
                key = prefix + rel
                try:
                    target = local_path_for_key(key, prefix, staging)
                except UnsafeKeyError as exc:
                    raise ChannelError(str(exc)) from None
                local = same.get((entry["sha256"], entry["size"]))
                if local is not None:  # unchanged since the live version: hard-link it, check it all the same
                    link_or_copy(local, target)
                    if target.stat().st_size == entry["size"] and file_sha256(target) == entry["sha256"]:
                        return 0
                    target.unlink()
                try:
                    nbytes = channel.storage.download_file(key, target)
                except StorageError as exc:
                    raise ChannelError(str(exc)) from exc
                size = target.stat().st_size
                if size != entry["size"]:
                    raise ChannelError(f"{channel.url(key)} has {size} bytes, the manifest says {entry['size']}")
                digest = file_sha256(target)
                if digest != entry["sha256"]:
                    raise ChannelError(f"{channel.url(key)} has sha256 {digest}, the manifest says {entry['sha256']}")
                return nbytes

            outcomes = _parallel(fetch, sorted(manifest["files"]), channel.storage.max_transfers)
            problems = sorted(str(error) for _, _, error in outcomes if error is not None)
            if problems:
                more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                raise ChannelError(f"refused version {version}: {'; '.join(problems[:3])}{more}")
            (staging / MANIFEST_NAME).write_bytes(manifest_data)  # for the next pull: what can be hard-linked
            publisher.publish(name, staging, version)
        except BaseException:
            publisher.discard(staging)
            raise
        return sum(result for _, result, _ in outcomes)

    @staticmethod
    def _files_of_live_version(publisher: Publisher, name: str) -> dict[tuple[str, int], Path]:
        """``(sha256, size) -> path`` in the live version, from the manifest this agent installed it with."""
        live = publisher.current(name)
        if live is None:
            return {}
        directory = publisher.releases / name / live
        try:
            manifest = parse_manifest((directory / MANIFEST_NAME).read_bytes(), str(directory / MANIFEST_NAME))
        except (OSError, ChannelError):
            return {}
        return {(e["sha256"], e["size"]): directory / rel for rel, e in manifest["files"].items()}

    def _warn_about_paths(self, kind: str, name: str, version: str, manifest: dict[str, Any],
                          publisher: Publisher) -> None:
        """A CLIP index names its images by absolute path (``index_data.pt``, ``metadata.json``)."""
        here = str(Path(os.path.abspath(publisher.releases)) / name / version)
        there = manifest.get("installed_at")
        if kind == "clip" and there and there != here and name not in self._warned_paths:
            self._warned_paths.add(name)
            log.warning("clip:%s: the index's gallery paths point into %s, this node installs into %s; use the "
                        "workers' INSPECTION_INDEX_ROOT/INSPECTION_INDEX_RELEASES here for the paths to resolve",
                        name, there, here)

    @staticmethod
    def _lock(publisher: Publisher):
        """One pull at a time per releases directory (a cron job overlapping ``--watch``)."""
        publisher.releases.mkdir(parents=True, exist_ok=True)
        return _FileLock(publisher.releases / ".pull.lock")

    def reload(self, labels: list[str]) -> str | None:
        """Run the reload hooks; ``"reload ok"``, ``"reload failed: ..."`` or ``None`` when there are none."""
        if not (self.reload_url or self.reload_command):
            return None
        try:
            if self.reload_url:
                request = urllib.request.Request(self.reload_url, data=json.dumps({"artefacts": labels}).encode(),
                                                 headers={"Content-Type": "application/json"}, method="POST")
                with urllib.request.urlopen(request, timeout=self.reload_timeout) as response:
                    response.read()
            if self.reload_command:
                done = subprocess.run(self.reload_command, env={**os.environ, "INSPECTION_PULLED": " ".join(labels)},
                                      capture_output=True, text=True, timeout=self.reload_timeout)
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
                    return f"reload failed: {self.reload_command[0]} exited {done.returncode} {tail[0]}".rstrip()
        except (OSError, subprocess.SubprocessError) as exc:  # URLError and HTTPError are OSErrors
            return f"reload failed: {exc}"
        return "reload ok"

    def watch(self, artefacts: list[str] | None, interval: float, stop: threading.Event | None = None) -> int:
        """:meth:`pull_once` every ``interval`` seconds until ``stop`` is set (SIGTERM/SIGINT from the CLI)."""
        stop = stop or threading.Event()
        log.info("Watching %s every %gs", ", ".join(artefacts or []) or "every artefact in the channel", interval)
        while not stop.is_set():
            try:
                self.pull_once(artefacts)
            except Exception:  # keep watching: the next round may succeed
                log.exception("Pull failed")
            stop.wait(interval)
        return 0


class _FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.handle = open(self.path, "a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


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


def pull_main(argv: list[str] | None = None) -> int:
    """``inspection-publish pull``: install the channel's current versions on this host."""
    settings = get_settings()
    parser = argparse.ArgumentParser(
        prog="inspection-publish pull",
        description="Install the release channel's current versions on a serving host: download, verify every "
                    "file's sha256 against the manifest, swap atomically. Needs no Airflow.")
    parser.add_argument("--artefact", action="append", default=[], metavar="ARTEFACT",
                        help="clip:normal, clip:defect, a product code (or patchcore:CODE); repeat; "
                             "default: every artefact in the channel")
    parser.add_argument("--index-root", type=Path, default=None,
                        help=f"CLIP indexes here (default: INSPECTION_INDEX_ROOT, {settings.index_root})")
    parser.add_argument("--index-releases", type=Path, help="kept CLIP versions (default: <index root>.releases)")
    parser.add_argument("--patchcore-root", type=Path, default=None,
                        help=f"PatchCore banks here (default: INSPECTION_PATCHCORE_ROOT, {settings.patchcore_root})")
    parser.add_argument("--patchcore-releases", type=Path, help="kept bank versions (default: <root>.releases)")
    parser.add_argument("--keep", type=int, default=settings.keep_versions, help="versions kept per artefact")
    parser.add_argument("--watch", action="store_true", help="keep pulling every --interval seconds")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between pulls with --watch")
    parser.add_argument("--reload-url", help="POST here after a pull swapped something")
    parser.add_argument("--reload-command", help="run (without a shell) after a pull swapped something")
    parser.add_argument("--reload-timeout", type=float, default=60.0)
    parser.add_argument("--bucket", default=settings.channel_bucket or settings.bucket,
                        help="default: INSPECTION_CHANNEL_BUCKET, else INSPECTION_BUCKET")
    parser.add_argument("--channel-prefix", default=settings.channel_prefix, help="default: INSPECTION_CHANNEL_PREFIX")
    parser.add_argument("--endpoint-url", help="e.g. https://kr.object.ncloudstorage.com (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--region", help="default: AWS_REGION / the profile's, else kr-standard")
    parser.add_argument("--profile", help="AWS profile with the access key and secret key (default: AWS_PROFILE, "
                                          "else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    parser.add_argument("--conn-id", help="use this Airflow connection instead (hosts that run Airflow)")
    parser.add_argument("--transfers", type=int, default=4, help="downloads at once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet = [logging.getLogger(name) for name in ("inspection_refresh.publish", "botocore.credentials")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # one line per change: ours
        logger.setLevel(logging.WARNING)
    try:
        return _run_agent(args, settings)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _run_agent(args: argparse.Namespace, settings: Any) -> int:
    if args.conn_id:
        storage: ObjectStorage = ObjectStorage(args.conn_id, args.bucket, max_transfers=args.transfers)
    else:
        storage = StandaloneStorage(args.bucket, endpoint_url=args.endpoint_url, region_name=args.region,
                                    profile=args.profile, max_transfers=args.transfers)
    index_root = args.index_root or settings.index_root
    patchcore_root = args.patchcore_root or settings.patchcore_root
    try:
        publishers = {
            "clip": Publisher(index_root, keep=args.keep, releases=args.index_releases or (
                settings.index_releases if args.index_root is None else default_releases_dir(index_root))),
            "patchcore": Publisher(patchcore_root, keep=args.keep, releases=args.patchcore_releases or (
                settings.patchcore_releases if args.patchcore_root is None else default_releases_dir(patchcore_root))),
        }
    except PublishError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    agent = NodeAgent({kind: ReleaseChannel(storage, kind, args.channel_prefix) for kind in KINDS}, publishers,
                      reload_url=args.reload_url, reload_command=args.reload_command,
                      reload_timeout=args.reload_timeout)
    if not args.watch:
        return agent.pull_once(args.artefact)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    return agent.watch(args.artefact, max(0.1, args.interval), stop)
