"""Versioned, atomic publishing of a directory the service reads, with rollback.

Layout for an artefact called ``name`` (``normal``, ``defect`` or a product code)::

    root/name -> ../root.releases/name/20261126T132000123456Z   (relative symlink)
    root.releases/name/<version>/...                             (kept versions)
    root.releases/name/.staging-<id>/                            (being written)
    root.releases/.inspection-releases                           (marker: the root it serves)

The service lists every directory under its root as a product, so nothing but the
live symlinks is ever created in ``root``: kept versions, staging directories and
temporary links live in a separate releases directory (default: the sibling
``<root>.releases``), which must be on the same filesystem.

The service keeps reading ``root/name/<file>``. A new version is written into a
staging directory, renamed to its version directory, and then a new symlink made
in the releases directory is renamed onto ``root/name`` with one ``rename(2)``,
which is atomic: a reader that resolves ``root/name`` gets the whole old version
or the whole new one, never a mix. A run that fails or crashes before the swap
leaves the old version live; its leftovers are removed by the next run. The last
``keep`` versions stay on disk, so :meth:`Publisher.rollback` is one symlink swap
as well.

A rolled-back name is usually *pinned*: ``root.releases/name/.pin.json`` says which
version, who and when. Scheduled deployments leave a pinned name alone, and
:meth:`Publisher.publish` refuses one unless told to ``unpin`` it (a manual deployment
replaces the rollback).

Roots published by older code kept versions in ``root/.releases/``; the next
publish, stage or rollback moves them out without ``root/name`` ever being
missing (see :mod:`inspection_refresh.publish_migration`, which also turns a plain
directory at ``root/name`` into a kept version).

The command line (``inspection-publish list|rollback|unpin|push|pull``) is :mod:`inspection_refresh.cli`.

With a release channel (``INSPECTION_PUBLISH_TARGETS`` = ``channel`` or ``both``, see
:mod:`inspection_refresh.channel`) publish, rollback, pin and unpin also go to object
storage: a version is uploaded and the channel's ``current.json`` moved before the local
swap, and a pin recorded in the channel is a pin for every publisher that shares it.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from inspection_refresh.config import default_releases_dir
from inspection_refresh.files import copy_tree_linked, write_json_atomic
from inspection_refresh.publish_migration import OLD_RELEASES_DIR, adopt_plain_directory, migrate_old_layout

log = logging.getLogger(__name__)

MARKER_FILE = ".inspection-releases"
"""Written into every releases directory (it holds the root's path) so tools can recognise one."""
PIN_FILE = ".pin.json"
"""Per name in the releases directory: the pinned version, who pinned it, when, from which run."""
_STAGING_PREFIX = ".staging-"
_SWAP_PREFIX = ".swap-"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class PublishError(RuntimeError):
    """Publishing or rolling back failed; the live version is unchanged."""


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    path: Path


def new_version_id(now: datetime | None = None) -> str:
    """A sortable, unique-enough version id: UTC time to the microsecond."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S%fZ")


def describe_pin(pin: dict[str, Any]) -> str:
    """``pinned to version V by W at T``, for messages and log lines."""
    return f"pinned to version {pin.get('version')} by {pin.get('pinned_by') or 'unknown'} at {pin.get('pinned_at')}"


def check_name(name: str) -> str:
    """Artefact names become directory names: letters, digits, ``._-`` only."""
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        raise PublishError(f"invalid artefact name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def is_published_root(path: str | os.PathLike) -> bool:
    """Whether :class:`Publisher` manages ``path``, so nothing else should write into it.

    True for the old layout (``path/.releases``) and for a root with a symlink that
    resolves to ``<releases>/<name>/<version>`` in a releases directory with the marker.
    """
    path = Path(path)
    if (path / OLD_RELEASES_DIR).exists():
        return True
    if not path.is_dir():
        return False
    for child in path.iterdir():
        if child.is_symlink():
            version_dir = Path(os.path.realpath(child))
            if (version_dir.parent.parent / MARKER_FILE).is_file():
                return True
    return False


def _remove(path: Path) -> None:
    """Remove a leftover whatever it is: a symlink, a file or a directory tree."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


class Channel(Protocol):
    """What a :class:`Publisher` asks of its release channel (:class:`inspection_refresh.channel.ReleaseChannel`,
    which builds on this module: hence a protocol, not an import)."""

    def read_pin(self, name: str) -> dict[str, Any] | None: ...

    def write_pin(self, name: str, pin: dict[str, Any]) -> None: ...

    def remove_pin(self, name: str) -> dict[str, Any] | None: ...

    def publish(self, name: str, version: str, directory: str | os.PathLike, *,
                installed_at: str | os.PathLike | None = None) -> Any: ...

    def make_current(self, name: str, version: str, directory: str | os.PathLike, *, by: str | None = None,
                     run_id: str | None = None) -> Any: ...


class Publisher:
    """Publishes versions of named directories under ``root``.

    :param root: directory the service reads (e.g. the CLIP index root); it only ever
        holds the live symlinks.
    :param keep: versions kept per name (the live one is always kept).
    :param releases: where versions are kept; on the filesystem of ``root`` and outside
        it. Default: :func:`default_releases_dir`.
    :param channel: a release channel in object storage that every publish, rollback, pin
        and unpin also goes to (``None``: this host only).
    """

    def __init__(self, root: str | os.PathLike, keep: int = 5, releases: str | os.PathLike | None = None,
                 channel: Channel | None = None) -> None:
        self.channel = channel
        self.root = Path(root)
        self.releases = Path(releases) if releases is not None else default_releases_dir(root)
        self.keep = max(1, keep)
        real_root, real_releases = Path(os.path.realpath(self.root)), Path(os.path.realpath(self.releases))
        if real_releases == real_root or real_root in real_releases.parents:
            raise PublishError(f"the releases directory {self.releases} must be outside {self.root}: "
                               "the service would take it for a published artefact")

    def _versions_dir(self, name: str) -> Path:
        return self.releases / check_name(name)

    def live_path(self, name: str) -> Path:
        return self.root / check_name(name)

    def stage(self, name: str) -> Path:
        """Create and return an empty staging directory for a new version of ``name``."""
        versions_dir = self._versions_dir(name)
        self._prepare()
        versions_dir.mkdir(exist_ok=True)
        self._remove_leftovers(name, _STAGING_PREFIX, _SWAP_PREFIX)
        staging = self._new_staging_path(name)
        staging.mkdir()
        return staging

    def discard(self, staging: str | os.PathLike) -> None:
        """Remove a staging directory that will not be published."""
        shutil.rmtree(staging, ignore_errors=True)

    def current(self, name: str) -> str | None:
        """The live version of ``name``, or ``None`` if nothing was published by us."""
        live = self.live_path(name)
        if not live.is_symlink():
            return None
        return Path(os.readlink(live)).name

    def versions(self, name: str) -> list[str]:
        """Kept versions of ``name``, oldest first."""
        versions_dir = self._versions_dir(name)
        if not versions_dir.is_dir():
            return []
        return sorted(p.name for p in versions_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def names(self) -> list[str]:
        """Names with a versions directory, i.e. published at least once."""
        if not self.releases.is_dir():
            return []
        return sorted(p.name for p in self.releases.iterdir() if p.is_dir() and _SAFE_NAME.match(p.name))

    def pinned(self, name: str) -> dict[str, Any] | None:
        """The pin of ``name`` (``version``, ``pinned_by``, ``pinned_at``, ``run_id``), or ``None``."""
        path = self._versions_dir(name) / PIN_FILE
        try:
            pin = json.loads(path.read_text())
            if not isinstance(pin, dict):
                raise ValueError(f"a JSON {type(pin).__name__}, not an object")
        except FileNotFoundError:
            pin = None
        except (OSError, ValueError) as exc:
            # Not "unpinned": a scheduled run must not overwrite what someone meant to keep.
            raise PublishError(f"the pin file {path} is unreadable ({exc}); remove it with "
                               f"'inspection-publish unpin --root {self.root} --name {name}'") from exc
        if self.channel is not None:  # pinned from another host sharing the channel
            return self.channel.read_pin(name) or pin
        return pin

    def pin(self, name: str, version: str, by: str | None, run_id: str | None = None) -> dict[str, Any]:
        """Pin a kept ``version`` of ``name``: scheduled deployments leave ``name`` alone until :meth:`unpin`."""
        if version not in self.versions(name):
            raise PublishError(f"cannot pin {name!r} to {version!r}: not a kept version")
        pin = {"version": version, "pinned_by": by, "pinned_at": datetime.now(timezone.utc).isoformat(),
               "run_id": run_id}
        write_json_atomic(self._versions_dir(name) / PIN_FILE, pin)
        if self.channel is not None:
            self.channel.write_pin(name, pin)
        log.info("Pinned %s to version %s (by %s)", name, version, by or "unknown")
        return pin

    def unpin(self, name: str) -> dict[str, Any] | None:
        """Remove the pin of ``name``; returns the pin removed (``None`` if there was none)."""
        path = self._versions_dir(name) / PIN_FILE
        try:
            pin = self.pinned(name)
        except PublishError:
            pin = {"version": None, "unreadable": str(path)}
        path.unlink(missing_ok=True)
        if self.channel is not None:
            pin = self.channel.remove_pin(name) or pin
        if pin:
            log.info("Unpinned %s (was %s)", name, describe_pin(pin))
        return pin

    def publish(self, name: str, staging: str | os.PathLike, version: str | None = None, *,
                unpin: bool = False) -> Release:
        """Make ``staging`` the live version of ``name`` atomically; prune old versions.

        A pinned ``name`` is refused unless ``unpin`` (a manual deployment replacing a rollback):
        then the pin is removed once the new version is live.
        """
        staging = Path(staging)
        versions_dir = self._versions_dir(name)
        if staging.parent.resolve() != versions_dir.resolve():
            raise PublishError(f"{staging} is not a staging directory of {name!r}; use Publisher.stage()")
        pin = self.pinned(name)
        if pin and not unpin:
            raise PublishError(f"{name} is {describe_pin(pin)}; not publishing over it (unpin it first)")
        version = version or new_version_id()
        target = versions_dir / version
        if target.exists():
            raise PublishError(f"version {version} of {name!r} already exists at {target}")
        self._prepare()
        self._remove_leftovers(name, _SWAP_PREFIX)  # not staging: ours is one of them
        adopt_plain_directory(self, name, f"{new_version_id()}-legacy")
        if self.channel is not None:  # upload, then move the channel's current.json; a failure leaves all as it was
            self.channel.publish(name, version, staging, installed_at=target)
        os.rename(staging, target)
        self._point_to(name, version)
        log.info("Published %s version %s at %s", name, version, self.live_path(name))
        if pin:
            self.unpin(name)
        self._prune(name)
        return Release(name, version, target)

    def rollback(self, name: str, to: str | None = None, *, pinned_by: str | None = None,
                 run_id: str | None = None) -> Release:
        """Re-publish ``to`` (default: the version before the live one).

        With ``pinned_by`` the version is also pinned, so scheduled deployments do not
        replace it (what the CLI and the ``deployment_rollback`` DAG do).
        """
        if (self.root / OLD_RELEASES_DIR).is_dir():
            self._prepare()  # moves the old layout's versions first, so they can be rolled back to
        kept = self.versions(name)
        live = self.current(name)
        if to is None:
            older = [v for v in kept if live is None or v < live]
            if not older:
                raise PublishError(f"no version of {name!r} older than {live} is kept under {self._versions_dir(name)}")
            to = older[-1]
        if to not in kept:
            raise PublishError(f"version {to!r} of {name!r} is not kept; kept versions: {', '.join(kept) or 'none'}")
        self._remove_leftovers(name, _SWAP_PREFIX)
        if self.channel is not None:  # first: if it fails, nothing changed (the rollback DAG never retries)
            self.channel.make_current(name, to, self._versions_dir(name) / to, by=pinned_by, run_id=run_id)
        self._point_to(name, to)
        log.info("Rolled %s back from %s to %s", name, live, to)
        if pinned_by is not None:
            self.pin(name, to, pinned_by, run_id)
        return Release(name, to, self._versions_dir(name) / to)

    # -- internals ------------------------------------------------------------------
    def _prepare(self) -> None:
        """Make the releases directory ready and clear what older code left in the root."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.releases.mkdir(parents=True, exist_ok=True)
        if os.stat(self.root).st_dev != os.stat(self.releases).st_dev:
            raise PublishError(f"the releases directory {self.releases} must be on the filesystem of {self.root}: "
                               "the live symlink is swapped with rename(2), which cannot cross filesystems")
        marker = self.releases / MARKER_FILE
        if not marker.exists():
            marker.write_text(f"{os.path.abspath(self.root)}\n")
        for swap in self.root.glob(f".*{_SWAP_PREFIX}*"):  # older code made its swap links in the root
            if swap.is_symlink():
                log.info("Removing a swap link left in the root by an interrupted run: %s", swap)
                swap.unlink(missing_ok=True)
        if (self.root / OLD_RELEASES_DIR).is_dir():
            with self._lock():  # parallel tasks (one per product) all reach this point
                migrate_old_layout(self, _SAFE_NAME.match)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.releases / MARKER_FILE, "a") as marker:
            fcntl.flock(marker, fcntl.LOCK_EX)
            yield

    def _new_staging_path(self, name: str) -> Path:
        return self._versions_dir(name) / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"

    def _copy_as_version(self, source: Path, name: str, version: str) -> Path:
        """Hard-link-copy ``source`` to a kept version, through staging so a crash leaves no half copy."""
        staging = self._new_staging_path(name)
        copy_tree_linked(source, staging)
        target = self._versions_dir(name) / version
        os.rename(staging, target)
        return target

    def _new_link(self, name: str, version: str) -> Path:
        """A symlink to ``version``, made in the releases directory so no temporary name shows in the root.

        Its target is relative to the root, where it ends up, so a root and its releases
        directory moved together stay valid. Real paths, in case either sits behind a symlink.
        """
        link = self._versions_dir(name) / f"{_SWAP_PREFIX}{uuid.uuid4().hex[:8]}"
        version_dir = os.path.realpath(self._versions_dir(name) / version)
        os.symlink(os.path.relpath(version_dir, os.path.realpath(self.root)), link)
        return link

    def _point_to(self, name: str, version: str) -> None:
        link = self._new_link(name, version)
        try:
            os.replace(link, self.live_path(name))  # rename(2): atomic for readers, also across directories
        except OSError:
            link.unlink(missing_ok=True)
            raise

    def _remove_leftovers(self, name: str, *prefixes: str) -> None:
        """Remove staging directories or temporary links that an interrupted run left behind."""
        for prefix in prefixes:
            for leftover in self._versions_dir(name).glob(f"{prefix}*"):
                log.info("Removing %s left by an interrupted run", leftover)
                _remove(leftover)

    def _prune(self, name: str) -> None:
        """Remove the oldest versions beyond ``keep``, but only ones older than the live version.

        After a rollback the newer versions are what an operator may roll forward to,
        so nothing newer than the live version is ever removed.
        """
        live = self.current(name)
        kept = self.versions(name)
        older = [v for v in kept if v < live] if live in kept else kept
        for version in older[: max(0, len(kept) - self.keep)]:
            shutil.rmtree(self._versions_dir(name) / version, ignore_errors=True)
            log.info("Pruned old version %s of %s (keeping %d)", version, name, self.keep)


def cli_user() -> str:
    """Who runs the command, for the pin (``cli:<login>``)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name in some containers
        return "cli"
