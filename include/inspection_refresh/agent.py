"""The node agent of serving hosts: ``inspection-publish pull`` keeps a host's roots at the release
channel's current versions.

It reads ``current.json``, downloads a new version into a staging directory, checks every file's
size and sha256 against the manifest (and the manifest against the pointer), and swaps it in with
the same atomic local :class:`~inspection_refresh.publish.Publisher`; anything missing or altered is
refused and the node keeps its version. With ``--trusted-key`` it installs only versions whose manifest
carries a valid signature of one of those keys (:mod:`inspection_refresh.signing`). After a swap it runs
the reload hooks (a URL to POST, a command). One pull at a time per releases directory (a file lock).

Needs boto3 (and cryptography for ``--trusted-key``), nothing of Airflow, torch or numpy:
``pip install "inspection-refresh[agent]"``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inspection_refresh.channel import ReleaseChannel, mb
from inspection_refresh.channel_bucket import KINDS, POINTER_NAME, parallel
from inspection_refresh.config import Settings, default_releases_dir, get_settings
from inspection_refresh.files import link_or_copy
from inspection_refresh.manifests import MANIFEST_NAME, ChannelError, file_sha256, parse_manifest, verify_directory
from inspection_refresh.publish import Publisher, PublishError, check_name
from inspection_refresh.signing import INSTALL_HINT, SignatureError, TrustedKeys
from inspection_refresh.storage import Boto3Source, ObjectStorage, StorageError, UnsafeKeyError, local_path_for_key

log = logging.getLogger(__name__)

ConnectionStorage = Callable[[str, "str | None", int], ObjectStorage]
"""``(conn_id, bucket, transfers) -> ObjectStorage`` through an Airflow connection (``--conn-id``),
given by the ``inspection-publish`` command on hosts that run Airflow."""


@dataclass
class Change:
    """One artefact a pull swapped to another version."""

    label: str
    old: str | None
    new: str
    files: int
    size: int
    downloaded: int
    signed_by: str | None = None
    """The trusted key that signed the version (``None``: the node checks no signatures)."""

    def line(self, reload: str | None) -> str:
        fetched = ("" if self.downloaded == self.size else " (nothing downloaded)" if not self.downloaded
                   else f" ({mb(self.downloaded)} downloaded)")
        signed = f", signed by key {self.signed_by}" if self.signed_by else ""
        return (f"{self.label}: {self.old or 'none'} -> {self.new}, {self.files} files, {mb(self.size)}{fetched}, "
                f"verified{signed}" + (f", {reload}" if reload else ""))


class NodeAgent:
    """Keeps a serving host's roots at the channel's current versions (``inspection-publish pull``).

    :param channels: one :class:`ReleaseChannel` per kind (``clip``, ``patchcore``).
    :param publishers: the node's local :class:`Publisher` per kind (its roots, ``keep``); set to keep no
        pins (``pins=False``): a pin left on the node neither blocks nor changes what it installs.
    :param reload_url: POSTed (JSON ``{"artefacts": [...]}``) after a pull swapped something.
    :param reload_command: run without a shell after a pull swapped something, with
        ``INSPECTION_PULLED`` = the artefacts swapped (space-separated).
    :param trusted_keys: when not empty, only versions signed by one of these keys are installed.
    """

    def __init__(self, channels: dict[str, ReleaseChannel], publishers: dict[str, Publisher], *,
                 reload_url: str | None = None, reload_command: str | None = None,
                 reload_timeout: float = 60.0, trusted_keys: TrustedKeys | None = None) -> None:
        self.channels = channels
        self.publishers = publishers
        for publisher in publishers.values():  # a serving host follows current.json only: no pin read or left
            publisher.pins = False
        self.trusted_keys = trusted_keys or TrustedKeys()
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
        signed_by = channel.verify_signature(name, version, data, self.trusted_keys) if self.trusted_keys else None
        self._warn_about_paths(channel.kind, name, version, manifest, publisher)
        kept = publisher.releases / name / version
        if version in publisher.versions(name):  # e.g. the channel rolled back: no download needed
            problems = verify_directory(kept, manifest, lambda rel: f"{kept / rel}")
            if not problems:
                publisher.rollback(name, version)
                return Change(label, live, version, manifest["count"], manifest["bytes"], 0, signed_by)
            log.warning("%s: the kept copy of version %s is damaged (%s); downloading it again", label, version,
                        problems[0])
            shutil.rmtree(kept)
        downloaded = self._install(channel, publisher, name, version, manifest, data)
        return Change(label, live, version, manifest["count"], manifest["bytes"], downloaded, signed_by)

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

            outcomes = parallel(fetch, sorted(manifest["files"]), channel.storage.max_transfers)
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


def main(argv: list[str] | None = None, *, connection_storage: ConnectionStorage | None = None) -> int:
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
    parser.add_argument("--trusted-key", action="append", default=[], type=Path, metavar="PATH",
                        help="PEM Ed25519 public key ('inspection-publish keygen'); repeat for a key rotation. "
                             "Given: only versions signed by one of these keys are installed")
    args = parser.parse_args(argv)
    missing = _missing_packages(args)
    if missing:  # one line, no traceback: what a serving host lacks and how to get it
        print(f"inspection-publish pull needs {' and '.join(missing)}: {INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        trusted = TrustedKeys.from_files(args.trusted_key)
    except SignatureError as exc:
        print(f"error: --trusted-key: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet = [logging.getLogger(name) for name in ("inspection_refresh.publish", "botocore.credentials")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # one line per change: ours
        logger.setLevel(logging.WARNING)
    try:
        return _run_agent(args, settings, connection_storage, trusted)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _missing_packages(args: argparse.Namespace) -> list[str]:
    """What this pull needs and the host lacks: boto3 (unless ``--conn-id``), cryptography (``--trusted-key``)."""
    needed = (["boto3"] if not args.conn_id else []) + (["cryptography"] if args.trusted_key else [])
    missing = []
    for name in needed:
        try:  # imported, not only found: boto3 without botocore is as unusable as none
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _run_agent(args: argparse.Namespace, settings: Settings, connection_storage: ConnectionStorage | None,
               trusted: TrustedKeys) -> int:
    if args.conn_id:
        if connection_storage is None:
            print("error: --conn-id needs Airflow: run 'inspection-publish pull' on a host with Airflow installed",
                  file=sys.stderr)
            return 2
        storage = connection_storage(args.conn_id, args.bucket, args.transfers)
    else:
        storage = ObjectStorage(Boto3Source(endpoint_url=args.endpoint_url, region_name=args.region,
                                            profile=args.profile), args.bucket, max_transfers=args.transfers)
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
                      reload_timeout=args.reload_timeout, trusted_keys=trusted)
    if not args.watch:
        return agent.pull_once(args.artefact)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    return agent.watch(args.artefact, max(0.1, args.interval), stop)
