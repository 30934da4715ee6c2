"""A root's releases directory: kept versions of each artefact, staged and swapped in atomically.

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
leaves the old version live; its leftovers are removed by the next run.

Roots published by older code kept versions in ``root/.releases/``; the next
publish, stage or rollback moves them out without ``root/name`` ever being
missing (see :mod:`inspection_refresh.publish_migration`, which also turns a plain
directory at ``root/name`` into a kept version).

:class:`ReleasesDir` is these local steps, on one host; :class:`~inspection_refresh.publish.Publisher`
builds publish, rollback and pins on them (with the release channel and the artefact lock).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from inspection_refresh.config import default_releases_dir
from inspection_refresh.files import copy_tree_linked, write_json_atomic
from inspection_refresh.publish_migration import OLD_RELEASES_DIR, migrate_old_layout

# The Publisher's logger: these lines are part of its publish, stage and rollback, and are filtered by that name.
log = logging.getLogger("inspection_refresh.publish")

MARKER_FILE = ".inspection-releases"
"""Written into every releases directory (it holds the root's path) so tools can recognise one."""
PIN_FILE = ".pin.json"
"""Per name in the releases directory: the pinned version, who pinned it, when, from which run."""
_STAGING_PREFIX = ".staging-"
SWAP_PREFIX = ".swap-"
"""Temporary links, made in a versions directory and renamed onto the live name."""
_LOCK_PREFIX = ".lock-"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
"""What an artefact name or version id may be (see :func:`check_name`)."""


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


def check_name(name: str) -> str:
    """Artefact names become directory names: letters, digits, ``._-`` only."""
    if not SAFE_NAME.match(name) or name in (".", ".."):
        raise PublishError(f"invalid artefact name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def is_published_root(path: str | os.PathLike) -> bool:
    """Whether a :class:`~inspection_refresh.publish.Publisher` manages ``path``, so nothing else should write into it.

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


class ReleasesDir:
    """The kept versions of the artefacts under ``root`` on this host, and the atomic swap of their live links.

    :param root: directory the service reads; it only ever holds the live symlinks.
    :param keep: versions kept per name (the live one is always kept).
    :param releases: where versions are kept; on the filesystem of ``root`` and outside
        it. Default: :func:`default_releases_dir`.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 5, releases: str | os.PathLike | None = None) -> None:
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
        self._remove_leftovers(name, _STAGING_PREFIX, SWAP_PREFIX)
        staging = self._new_staging_path(name)
        staging.mkdir()
        return staging

    def discard(self, staging: str | os.PathLike) -> None:
        """Remove a staging directory that will not be published."""
        shutil.rmtree(staging, ignore_errors=True)

    def current(self, name: str) -> str | None:
        """The version this host's live link points to, or ``None`` if nothing was published by us."""
        live = self.live_path(name)
        if not live.is_symlink():
            return None
        return Path(os.readlink(live)).name

    def versions(self, name: str) -> list[str]:
        """Kept versions of ``name`` on this host, oldest first."""
        versions_dir = self._versions_dir(name)
        if not versions_dir.is_dir():
            return []
        return sorted(p.name for p in versions_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def names(self) -> list[str]:
        """Names with a versions directory, i.e. published at least once."""
        if not self.releases.is_dir():
            return []
        return sorted(p.name for p in self.releases.iterdir() if p.is_dir() and SAFE_NAME.match(p.name))

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
        for swap in self.root.glob(f".*{SWAP_PREFIX}*"):  # older code made its swap links in the root
            if swap.is_symlink():
                log.info("Removing a swap link left in the root by an interrupted run: %s", swap)
                swap.unlink(missing_ok=True)
        if (self.root / OLD_RELEASES_DIR).is_dir():
            with self._lock():  # parallel tasks (one per product) all reach this point
                migrate_old_layout(self, SAFE_NAME.match)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.releases / MARKER_FILE, "a") as marker:
            fcntl.flock(marker, fcntl.LOCK_EX)
            yield

    @contextmanager
    def _file_lock(self, name: str) -> Iterator[None]:
        """``name``'s lock for the processes of this host (a publisher without a lock shared by hosts)."""
        self.releases.mkdir(parents=True, exist_ok=True)
        with open(self.releases / f"{_LOCK_PREFIX}{check_name(name)}", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
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
        link = self._versions_dir(name) / f"{SWAP_PREFIX}{uuid.uuid4().hex[:8]}"
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


    def _add_version(self, name: str, version: str, fill: Callable[[Path], object]) -> None:
        """Make kept ``version`` of ``name`` out of what ``fill`` writes into a new staging directory (a version
        fetched from elsewhere); one that another process installed meanwhile is fine."""
        self._prepare()
        self._versions_dir(name).mkdir(exist_ok=True)
        staging = self._new_staging_path(name)
        staging.mkdir()
        try:
            fill(staging)
            os.rename(staging, self._versions_dir(name) / version)
        except OSError:
            if not (self._versions_dir(name) / version).is_dir():  # fetched by another process meanwhile: fine
                raise
        finally:
            self.discard(staging)

    def _make_live_here(self, name: str, version: str, staging: Path) -> None:
        """Make ``version`` this host's live version, from ``staging`` if it is not kept here (else it goes)."""
        target = self._versions_dir(name) / version
        if target.is_dir():
            self.discard(staging)
        else:
            os.rename(staging, target)
        if self.current(name) != version:
            self._remove_leftovers(name, SWAP_PREFIX)
            self._point_to(name, version)

    def _read_pin_file(self, name: str) -> dict[str, Any] | None:
        """This host's pin of ``name`` (``PIN_FILE``), or ``None``; unreadable: :class:`PublishError`."""
        path = self._versions_dir(name) / PIN_FILE
        try:
            pin = json.loads(path.read_text())
            if not isinstance(pin, dict):
                raise ValueError(f"a JSON {type(pin).__name__}, not an object")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # Not "unpinned": a scheduled run must not overwrite what someone meant to keep.
            raise PublishError(f"the pin file {path} is unreadable ({exc}); remove it with "
                               f"'inspection-publish unpin --root {self.root} --name {name}'") from exc
        return pin

    def _write_pin_file(self, name: str, pin: dict[str, Any] | None) -> None:
        """Write (``pin``) or remove (``None``) this host's pin of ``name``."""
        if pin is None:
            (self._versions_dir(name) / PIN_FILE).unlink(missing_ok=True)
        else:
            write_json_atomic(self._versions_dir(name) / PIN_FILE, pin)

    def _prune_kept(self, name: str) -> None:
        """Remove the oldest versions beyond ``keep`` on this host, but only ones older than the live version
        (after a rollback the newer ones are what an operator may roll forward to)."""
        live = self.current(name)
        kept = self.versions(name)
        older = [v for v in kept if v < live] if live in kept else kept
        for version in older[: max(0, len(kept) - self.keep)]:
            shutil.rmtree(self._versions_dir(name) / version, ignore_errors=True)
            log.info("Pruned old version %s of %s (keeping %d)", version, name, self.keep)
