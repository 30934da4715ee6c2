"""Versioned, atomic publishing of a directory the service reads, with rollback.

Layout under ``root`` for an artefact called ``name`` (``normal``, ``defect`` or a
product code)::

    root/name -> .releases/name/20261126T132000123456Z     (relative symlink)
    root/.releases/name/<version>/...                      (kept versions)
    root/.releases/name/.staging-<id>/                     (being written)

The service keeps reading ``root/name/<file>``. A new version is written into a
staging directory, renamed to its version directory, and then the symlink is
swapped with one ``rename(2)``, which is atomic: a reader that resolves
``root/name`` gets the whole old version or the whole new one, never a mix. A run
that fails or crashes before the swap leaves the old version live; its staging
directory is removed by the next run. The last ``keep`` versions stay on disk, so
:meth:`Publisher.rollback` is one symlink swap as well.

Command line (one-step rollback)::

    inspection-publish list     --root /data/inspection/clip_index --name normal
    inspection-publish rollback --root /data/inspection/clip_index --name normal [--to VERSION]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

RELEASES_DIR = ".releases"
_STAGING_PREFIX = ".staging-"
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


def check_name(name: str) -> str:
    """Artefact names become directory names: letters, digits, ``._-`` only."""
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        raise PublishError(f"invalid artefact name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


class Publisher:
    """Publishes versions of named directories under ``root``.

    :param root: directory the service reads (e.g. the CLIP index root).
    :param keep: versions kept per name (the live one is always kept).
    """

    def __init__(self, root: str | os.PathLike, keep: int = 5) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)

    def _releases(self, name: str) -> Path:
        return self.root / RELEASES_DIR / check_name(name)

    def live_path(self, name: str) -> Path:
        return self.root / check_name(name)

    def stage(self, name: str) -> Path:
        """Create and return an empty staging directory for a new version of ``name``."""
        releases = self._releases(name)
        releases.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging(name)
        staging = releases / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
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
        releases = self._releases(name)
        if not releases.is_dir():
            return []
        return sorted(p.name for p in releases.iterdir() if p.is_dir() and not p.name.startswith("."))

    def publish(self, name: str, staging: str | os.PathLike, version: str | None = None) -> Release:
        """Make ``staging`` the live version of ``name`` atomically; prune old versions."""
        staging = Path(staging)
        releases = self._releases(name)
        if staging.parent.resolve() != releases.resolve():
            raise PublishError(f"{staging} is not a staging directory of {name!r}; use Publisher.stage()")
        version = version or new_version_id()
        target = releases / version
        if target.exists():
            raise PublishError(f"version {version} of {name!r} already exists at {target}")
        self._adopt_legacy_directory(name)
        os.rename(staging, target)
        self._point_to(name, version)
        log.info("Published %s version %s at %s", name, version, self.live_path(name))
        self._prune(name)
        return Release(name, version, target)

    def rollback(self, name: str, to: str | None = None) -> Release:
        """Re-publish ``to`` (default: the version before the live one)."""
        kept = self.versions(name)
        live = self.current(name)
        if to is None:
            older = [v for v in kept if live is None or v < live]
            if not older:
                raise PublishError(f"no version of {name!r} older than {live} is kept under {self._releases(name)}")
            to = older[-1]
        if to not in kept:
            raise PublishError(f"version {to!r} of {name!r} is not kept; kept versions: {', '.join(kept) or 'none'}")
        self._point_to(name, to)
        log.info("Rolled %s back from %s to %s", name, live, to)
        return Release(name, to, self._releases(name) / to)

    # -- internals ------------------------------------------------------------------
    def _point_to(self, name: str, version: str) -> None:
        live = self.live_path(name)
        swap = self.root / f".{name}.swap-{uuid.uuid4().hex[:8]}"
        os.symlink(Path(RELEASES_DIR) / name / version, swap)
        try:
            os.replace(swap, live)  # rename(2): atomic for readers
        except OSError:
            swap.unlink(missing_ok=True)
            raise

    def _adopt_legacy_directory(self, name: str) -> None:
        """A real directory at ``root/name`` (made before this package) becomes a kept version."""
        live = self.live_path(name)
        if live.is_dir() and not live.is_symlink():
            legacy = f"{new_version_id()}-legacy"
            log.warning("Moving the existing directory %s into %s to keep it for rollback",
                        live, self._releases(name) / legacy)
            os.rename(live, self._releases(name) / legacy)

    def _remove_stale_staging(self, name: str) -> None:
        for leftover in self._releases(name).glob(f"{_STAGING_PREFIX}*"):
            log.info("Removing staging directory left by an interrupted run: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

    def _prune(self, name: str) -> None:
        live = self.current(name)
        kept = self.versions(name)
        for version in kept[: max(0, len(kept) - self.keep)]:
            if version != live:
                shutil.rmtree(self._releases(name) / version, ignore_errors=True)
                log.info("Pruned old version %s of %s (keeping %d)", version, name, self.keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inspection-publish", description="List or roll back published versions.")
    parser.add_argument("action", choices=["list", "rollback"])
    parser.add_argument("--root", required=True, help="index root or PatchCore root")
    parser.add_argument("--name", required=True, help="normal, defect, or a product code")
    parser.add_argument("--to", help="version to re-publish (default: the one before the live version)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    publisher = Publisher(args.root)
    try:
        if args.action == "rollback":
            release = publisher.rollback(args.name, args.to)
            print(f"{args.name}: live version is now {release.version}")
        else:
            live = publisher.current(args.name)
            for version in publisher.versions(args.name):
                print(f"{'*' if version == live else ' '} {version}")
    except PublishError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
