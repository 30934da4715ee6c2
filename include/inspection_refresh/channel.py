"""The release channel in object storage: versions published into it, signed, made current, pruned.

Publishing with ``INSPECTION_PUBLISH_TARGETS`` = ``channel`` or ``both`` also puts every
version into the bucket, so serving hosts that do not run Airflow install the same
bytes. The layout in the bucket (``<prefix><kind>/<name>/<version>/...``, ``current.json``,
``pin.json``) and the reading and writing of single objects are :mod:`inspection_refresh.channel_bucket`;
the manifest format is :mod:`inspection_refresh.manifests`.

A version's objects never change once its manifest is there, and ``current.json`` is
written only after the manifest, so a reader that starts from ``current.json`` finds the
whole version it names: the old one or the new one, never a mix. A version prefix without
a manifest is an unfinished upload that nothing points to.

:class:`ReleaseChannel` is what :class:`~inspection_refresh.publish.Publisher` calls when
it has a channel (publish, rollback, pin, unpin, prune); the publisher holds the artefact's
lock around every write of ``current.json``, ``pin.json`` and every prune. Serving hosts install from it with the
node agent (:mod:`inspection_refresh.agent`, ``inspection-publish pull``), which checks
every file against the manifest (:func:`~inspection_refresh.manifests.verify_directory`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from inspection_refresh.channel_bucket import POINTER_NAME, ChannelBucket, parallel
from inspection_refresh.manifests import (
    MANIFEST_NAME, SIGNATURE_NAME, ChannelError, file_sha256, json_bytes, parse_manifest, verify_directory,
)
from inspection_refresh.publish import cli_user
from inspection_refresh.signing import ManifestSigner, SignatureError, TrustedKeys, signature_key_id
from inspection_refresh.storage import (
    ObjectStorage, StorageError, is_safe_relative_key, is_transient, local_path_for_key,
)

log = logging.getLogger(__name__)

FORMAT = 1
INCOMPLETE_GRACE = timedelta(hours=24)
"""A version prefix without a manifest this much older than its version id is a dead upload: pruned."""
_VERSION_TIME = re.compile(r"^(\d{8}T\d{6})(\d{6})Z")


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


class ReleaseChannel(ChannelBucket):
    """Versions of one kind of artefact in a bucket: upload, ``current.json``, pins, pruning.

    :param storage: the bucket (through an Airflow connection, or boto3's credential chain on a serving host).
    :param kind: ``clip`` or ``patchcore``.
    :param prefix: where the channel lives in the bucket (``deployments/``).
    :param keep: complete versions kept per name; never the current or the pinned one.
    :param signer: signs every manifest this channel writes (``INSPECTION_SIGNING_CONN_ID``); ``None``: unsigned.
    """

    def __init__(self, storage: ObjectStorage, kind: str, prefix: str = "deployments/", keep: int = 5, *,
                 signer: ManifestSigner | None = None) -> None:
        super().__init__(storage, kind, prefix)
        self.keep = max(1, keep)
        self.signer = signer

    # -- publishing -----------------------------------------------------------------
    def ready_version(self, name: str, version: str, directory: str | os.PathLike, *, by: str | None = None,
                      run_id: str | None = None) -> bytes:
        """The manifest of ``version``, complete in the channel: uploaded from ``directory`` first if the channel
        lacks it (a version published before the channel was switched on). A publisher calls this before it
        takes the artefact's lock, and :meth:`move_pointer` under it."""
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
            self.ensure_signed(name, version, manifest, directory)
        return manifest

    def download_version(self, name: str, version: str, directory: str | os.PathLike) -> bytes:
        """Download complete ``version`` into the empty ``directory`` and check every file against its manifest
        (a rollback on a worker whose working copy lacks the version); returns the manifest, also written
        into ``directory`` as the node agent does."""
        found = self.manifest(name, version)
        if found is None:
            raise ChannelError(f"version {version} of {self.label(name)} is not in the channel: "
                               f"{self.url(self.manifest_key(name, version))} does not exist")
        data, manifest = found
        prefix, directory = self.version_prefix(name, version), Path(directory)
        outcomes = parallel(lambda rel: self.storage.download_file(
            prefix + rel, local_path_for_key(prefix + rel, prefix, directory)), sorted(manifest["files"]),
            self.storage.max_transfers)
        problems = [f"{self.url(prefix + rel)}: {error}" for rel, _, error in outcomes if error is not None]
        problems = problems or verify_directory(directory, manifest, lambda rel: self.url(prefix + rel))
        if problems:
            raise ChannelError(f"version {version} of {self.label(name)} could not be fetched from the channel: "
                               f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        (directory / MANIFEST_NAME).write_bytes(data)
        return data

    def upload_version(self, name: str, version: str, directory: str | os.PathLike, *,
                       installed_at: str | os.PathLike | None = None, by: str | None = None,
                       run_id: str | None = None) -> bytes:
        """Upload every file of ``directory`` under the version prefix, then its signature (with a
        signer), then its manifest; returns the manifest.

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
        files.pop(SIGNATURE_NAME, None)
        unsafe = [rel for rel in files if not is_safe_relative_key(rel)]
        if unsafe:  # the manifest would be refused by every reader: say so before uploading anything
            raise ChannelError(f"{files[unsafe[0]]} cannot be published: its path {unsafe[0]!r} is not a safe "
                               "relative path (no backslashes or empty segments); rename it")
        if self.signer is not None:  # a key that cannot sign fails now, not after the upload
            self._signature(name, version)
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
        manifest = json_bytes(document)
        if self.signer is not None:  # before the manifest: once the version is complete, it is signed
            self._write_bytes(self.signature_key(name, version), self._signature(name, version, manifest)[1])
        self._write_bytes(self.manifest_key(name, version), manifest)  # last: the version is complete
        log.info("Uploaded %s version %s to %s: %d files, %s (%d unchanged, copied in the bucket), %.1fs",
                 self.label(name), version, self.url(prefix), len(entries), mb(document["bytes"]), copied,
                 time.monotonic() - started)
        return manifest

    # -- signatures -----------------------------------------------------------------
    def _signature(self, name: str, version: str, manifest: bytes | None = None) -> tuple[str, bytes]:
        """The signer's key id, and the signature document of ``manifest`` (``b""`` when none is given)."""
        assert self.signer is not None
        try:
            return self.signer.key_id, self.signer.sign(manifest) if manifest is not None else b""
        except SignatureError as exc:
            raise ChannelError(f"cannot sign version {version} of {self.label(name)}: {exc}") from None

    def ensure_signed(self, name: str, version: str, manifest: bytes, directory: str | os.PathLike) -> None:
        """With a signer: give ``version`` this signer's signature before a pointer names it again (a version
        uploaded before signing was switched on, or signed with a key rotated away since).

        Only if the copy kept at ``directory`` was published from this host (not downloaded from the channel)
        and matches the manifest file for file: the signature vouches for what this system published, never for
        whatever the bucket holds now. Otherwise an unsigned version is refused, and one signed with an
        earlier key keeps that signature (with a warning).
        """
        if self.signer is None:
            return
        key = self.signature_key(name, version)
        found = self.read(key)
        kid = self._signature(name, version)[0]
        if found is not None and signature_key_id(found) == kid:
            if self.signer.signed(manifest, found):
                return
            found = None  # this key's signature, but of other bytes: the manifest changed since, as if unsigned
        where = self.url(self.manifest_key(name, version))
        directory = Path(directory)
        if not directory.is_dir():
            problems = [f"{directory} does not exist"]
        elif (directory / MANIFEST_NAME).exists():  # fetched from the channel: it can only repeat the bucket
            problems = [f"{directory} was downloaded from the channel, not published from this host"]
        else:
            problems = verify_directory(directory, parse_manifest(manifest, where), lambda rel: str(directory / rel))
        if problems and found is not None:  # signed by an earlier key: nodes that still trust it accept it
            log.warning("%s: version %s stays signed with key %s, not the current key %s: the copy kept on this host "
                        "cannot vouch for %s (%s); nodes that no longer trust key %s refuse it", self.label(name),
                        version, signature_key_id(found), kid, where, problems[0], signature_key_id(found))
            return
        if problems:
            raise ChannelError(f"version {version} of {self.label(name)} has no valid signature, and the copy kept "
                               f"on this host cannot vouch for {where} ({problems[0]}); serving hosts that verify "
                               "signatures would refuse it: publish a new version instead")
        self._write_bytes(key, self._signature(name, version, manifest)[1])
        log.info("%s: signed version %s with key %s (it was %s)", self.label(name), version, kid,
                 f"signed with key {signature_key_id(found)}" if found is not None else "without a valid signature")

    def verify_signature(self, name: str, version: str, manifest: bytes, trusted: TrustedKeys) -> str:
        """The id of the trusted key that signed ``version``'s ``manifest``; otherwise :class:`ChannelError`
        ("refused version ...": unsigned, an untrusted key, altered, or signed for another artefact or version)."""
        key = self.signature_key(name, version)
        signature = self.read(key)
        if signature is None:
            raise ChannelError(f"refused version {version}: it is unsigned ({self.url(key)} does not exist) and this "
                               "node installs only versions signed by a trusted key (--trusted-key)")
        try:
            kid = trusted.verify(manifest, signature)
        except SignatureError as exc:
            raise ChannelError(f"refused version {version}: {exc} ({self.url(key)})") from None
        document = json.loads(manifest)
        signed_for = (document.get("kind"), document.get("name"), document.get("version"))
        if signed_for != (self.kind, name, version):  # a signed manifest replayed under another name
            raise ChannelError(f"refused version {version}: {self.url(self.manifest_key(name, version))} is signed "
                               f"for {':'.join(map(str, signed_for))}, not {self.kind}:{name}:{version}")
        return kid

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

    def move_pointer(self, name: str, version: str, manifest: bytes, *, by: str | None = None,
                     run_id: str | None = None, action: str = "publish") -> dict[str, Any]:
        """Point ``current.json`` at the complete ``version`` whose manifest is ``manifest``; returns the pointer.
        Unconditional: the caller holds the artefact's lock and has re-read the pointer and pin under it."""
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
        pinned, and unfinished uploads older than :data:`INCOMPLETE_GRACE`; returns the versions removed.

        A :class:`~inspection_refresh.publish.Publisher` prunes under the artefact's lock, so no rollback
        moves the pointer meanwhile; the pointer and pin are re-read before each removal all the same (a
        caller without the lock then loses at most the race of one removal, never a version chosen before).
        """
        live, pinned = self._pointed_and_pinned(name)
        complete, incomplete = self._scan(name)
        older = [v for v in complete if v < live] if live in complete else complete
        doomed = [v for v in older if v != pinned][: max(0, len(complete) - self.keep)]
        cutoff = datetime.now(timezone.utc) - INCOMPLETE_GRACE
        for version in incomplete:
            match = _VERSION_TIME.match(version)
            if match and datetime.strptime(match.group(1) + match.group(2), "%Y%m%dT%H%M%S%f").replace(
                    tzinfo=timezone.utc) < cutoff:
                doomed.append(version)
        removed = []
        for version in doomed:
            if version in self._pointed_and_pinned(name):  # rolled back to (or pinned) since the scan
                continue
            self._remove_version(name, version)
            removed.append(version)
            log.info("Pruned version %s of %s from the channel (keeping %d)", version, self.label(name), self.keep)
        return removed

