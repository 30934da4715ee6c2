"""Taking over what older code left in a published root, without a moment where a name is missing.

Two older layouts become :class:`~inspection_refresh.releases_dir.ReleasesDir`'s:

* versions kept inside the root, in ``root/.releases/<name>/<version>`` (where the service
  mistook ``.releases`` for a product): :func:`migrate_old_layout` moves them to the
  releases directory, re-pointing each live symlink before its old target goes;
* a plain directory at ``root/name``, made before this package:
  :func:`adopt_plain_directory` keeps it as a version and puts a symlink in its place with
  one ``renameat2(RENAME_EXCHANGE)`` (:func:`_exchange`), because ``rename(2)`` cannot put
  a symlink where a non-empty directory is.

The Publisher calls these while it publishes, stages or rolls back. They work through the
few methods of its releases directory that :class:`Versions` names (a protocol, not an import:
:mod:`inspection_refresh.releases_dir` imports this module).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Protocol

# The Publisher's logger: these lines are part of its publish, stage and rollback, and are filtered by that name.
log = logging.getLogger("inspection_refresh.publish")

OLD_RELEASES_DIR = ".releases"
"""Where older code kept versions: inside the root, where the service mistook it for a product."""


class Versions(Protocol):
    """What the moves ask of a :class:`~inspection_refresh.releases_dir.ReleasesDir`: where a name's versions
    and live link are, and its two steps that never leave the live name missing."""

    root: Path

    def live_path(self, name: str) -> Path: ...

    def _versions_dir(self, name: str) -> Path: ...

    def _copy_as_version(self, source: Path, name: str, version: str) -> Path: ...

    def _new_link(self, name: str, version: str) -> Path: ...

    def _point_to(self, name: str, version: str) -> None: ...


class _ExchangeUnsupported(OSError):
    """The kernel, C library or filesystem cannot exchange two paths atomically."""


def _exchange(first: Path, second: Path) -> None:
    """Swap two paths in one step with Linux ``renameat2(RENAME_EXCHANGE)``.

    ``os.replace`` cannot put a symlink where a non-empty directory is; exchanging them
    does, without a moment where neither is there.
    """
    at_fdcwd, rename_exchange = -100, 2
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError) as exc:
        raise _ExchangeUnsupported(errno.ENOSYS, "renameat2 is not available") from exc
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) != 0:
        code = ctypes.get_errno()
        error = _ExchangeUnsupported if code in (errno.ENOSYS, errno.EINVAL) else OSError
        raise error(code, os.strerror(code), str(first), None, str(second))


def migrate_old_layout(publisher: Versions, is_name: Callable[[str], object]) -> None:
    """Move versions from ``root/.releases/`` to the releases directory, keeping every name live.

    Versions that are not live are renamed across. The live one is hard-link-copied,
    the live symlink is re-pointed to the copy in one step, and only then is the old
    copy removed. A crash at any point leaves a live ``root/name``; the next run
    finishes the move. Only directories whose names pass ``is_name`` are artefacts.
    The caller holds the releases directory's lock.
    """
    old_releases = publisher.root / OLD_RELEASES_DIR
    if not old_releases.is_dir():
        return  # another process finished the move while we waited for the lock
    for old_dir in sorted(p for p in old_releases.iterdir() if p.is_dir() and is_name(p.name)):
        name = old_dir.name
        publisher._versions_dir(name).mkdir(exist_ok=True)
        live_dir = Path(os.path.realpath(publisher.live_path(name)))
        versions = sorted(p for p in old_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        for old_version in versions:
            target = publisher._versions_dir(name) / old_version.name
            if Path(os.path.realpath(old_version)) == live_dir:
                if not target.exists():
                    publisher._copy_as_version(old_version, name, old_version.name)
                publisher._point_to(name, old_version.name)
                shutil.rmtree(old_version)
            elif target.exists():
                shutil.rmtree(old_version)  # moved by a run that crashed before removing the old copy
            else:
                os.rename(old_version, target)
        shutil.rmtree(old_dir)  # what is left: staging directories of crashed runs
        log.info("Moved %d kept versions of %s from %s to %s", len(versions), name, old_dir,
                 publisher._versions_dir(name))
    shutil.rmtree(old_releases)


def adopt_plain_directory(publisher: Versions, name: str, version: str) -> None:
    """A real directory at ``root/name`` (made before this package) becomes kept ``version``.

    It is hard-link-copied to ``version`` and then exchanged with a symlink to that
    copy in one step, so ``root/name`` is never missing. Nothing happens when
    ``root/name`` is not a real directory.
    """
    live = publisher.live_path(name)
    if not live.is_dir() or live.is_symlink():
        return
    log.warning("Keeping the existing directory %s as version %s for rollback", live, version)
    publisher._copy_as_version(live, name, version)
    link = publisher._new_link(name, version)
    try:
        _exchange(link, live)
        replaced = link  # the exchange left the old directory where the link was
    except _ExchangeUnsupported as exc:
        log.warning("Atomic exchange is unavailable here (%s): %s is missing for a moment while it "
                    "becomes a symlink", exc.strerror, live)
        replaced = link.with_name(link.name + "-old")
        os.rename(live, replaced)
        try:
            os.rename(link, live)
        except OSError:
            os.rename(replaced, live)
            raise
    except OSError:
        link.unlink(missing_ok=True)
        raise
    shutil.rmtree(replaced)
