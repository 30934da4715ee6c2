"""A version's release manifest: its file names, parsing it safely, and checking a directory against it.

A manifest (``.release-manifest.json``, the last object of a version in the release channel, and kept in
each version directory a node installed) lists the sha256 and size of every file of the version; its
signature (``.release-manifest.sig``) is uploaded right before it. :func:`parse_manifest` refuses any
path that could leave the version directory, and :func:`verify_directory` says what differs between a
directory and its manifest: what the Airflow side checks before it signs, and a node before it installs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inspection_refresh.releases_dir import PublishError
from inspection_refresh.storage import is_safe_relative_key

MANIFEST_NAME = ".release-manifest.json"
"""In each version prefix (last object uploaded), and in each version directory a node installed."""
SIGNATURE_NAME = ".release-manifest.sig"
"""In each version prefix when the channel signs (:mod:`inspection_refresh.signing`): uploaded right before
the manifest, so a complete version of a signing channel is a signed one."""
SHA256 = re.compile(r"^[0-9a-f]{64}$")
"""A sha256 as manifests and pointers write it: 64 lowercase hex digits."""


class ChannelError(PublishError):
    """The channel refuses an operation, or holds something a node must not install (such as a manifest that
    :func:`parse_manifest` refuses)."""


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def json_bytes(document: dict[str, Any]) -> bytes:
    """A document as the channel writes it (a manifest, ``current.json``, ``pin.json``)."""
    return (json.dumps(document, indent=2, default=str) + "\n").encode()


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """A manifest's content, checked: every file has a safe relative path, a sha256 and a size.

    A path that could leave the version directory (``..``, ``.`` or empty segments, absolute, a backslash,
    a drive, NUL) is refused here, naming the manifest and the path: nothing joins it to a directory.
    """
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not an object")
        for rel, entry in files.items():
            if not is_safe_relative_key(rel):
                raise ChannelError(f"{where} names the path {rel!r}, which escapes the version directory "
                                   "(paths must be relative, without '..', '.', empty segments or backslashes); "
                                   "refusing the whole version")
            if not (isinstance(entry, dict) and SHA256.match(str(entry.get("sha256")))
                    and isinstance(entry.get("size"), int) and entry["size"] >= 0):
                raise ValueError(f"entry {rel!r} lacks a sha256 or a size")
            if rel in (MANIFEST_NAME, SIGNATURE_NAME):
                raise ValueError(f"lists {rel} itself")
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
        if not is_safe_relative_key(rel):  # parse_manifest refuses these; a hand-made manifest may not
            problems.append(f"{where(rel)} is outside the version directory")
        elif not path.is_file():
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
