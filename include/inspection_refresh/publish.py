"""Publishing, rollback and pins of the artefacts under a root the service reads, under the artefact lock.

The versions live in the root's releases directory (:mod:`inspection_refresh.releases_dir`: its layout,
staging, and the atomic swap of ``root/name``); a :class:`Publisher` decides what goes live there. The last
``keep`` versions stay on disk, so :meth:`Publisher.rollback` is one symlink swap as well.

A rolled-back name is usually *pinned*: ``root.releases/name/.pin.json`` says which
version, who and when. Scheduled deployments leave a pinned name alone, and
:meth:`Publisher.publish` refuses one unless told to ``unpin`` it (a manual deployment
replaces the rollback).

The command line (``inspection-publish list|rollback|unpin|push|pull``) is :mod:`inspection_refresh.cli`.

With a release channel (``INSPECTION_PUBLISH_TARGETS`` = ``channel`` or ``both``, see
:mod:`inspection_refresh.channel`) publish, rollback, pin and unpin also go to object
storage: a version is uploaded and the channel's ``current.json`` moved before the local
swap, and the channel's ``pin.json`` is the one pin of every publisher that shares it.

Several hosts change the same artefacts, so every change of what is live (publish,
rollback, pin, unpin, prune) holds the artefact's lock (given by
:func:`inspection_refresh.compose.artefact_lock`: a named lock of the deployment database)
and re-reads the pin and the live version under it, right before the pointer moves.
Uploads and downloads happen before the lock is taken. In order: pin, ``current.json``,
the local link; once ``current.json`` names a version it is live, whatever fails later.
"""

from __future__ import annotations

import getpass
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from inspection_refresh.publish_migration import OLD_RELEASES_DIR, adopt_plain_directory
from inspection_refresh.releases_dir import (
    PIN_FILE, SAFE_NAME, SWAP_PREFIX, PublishError, Release, ReleasesDir, check_name, new_version_id,
)

log = logging.getLogger(__name__)


def describe_pin(pin: dict[str, Any]) -> str:
    """``pinned to version V by W at T``, for messages and log lines."""
    return f"pinned to version {pin.get('version')} by {pin.get('pinned_by') or 'unknown'} at {pin.get('pinned_at')}"



class Channel(Protocol):
    """What a :class:`Publisher` asks of its release channel (:class:`inspection_refresh.channel.ReleaseChannel`,
    which builds on this module: hence a protocol, not an import)."""

    def pointer(self, name: str) -> dict[str, Any] | None: ...

    def versions(self, name: str) -> list[str]: ...

    def read_pin(self, name: str) -> dict[str, Any] | None: ...

    def write_pin(self, name: str, pin: dict[str, Any]) -> None: ...

    def remove_pin(self, name: str) -> dict[str, Any] | None: ...

    def upload_version(self, name: str, version: str, directory: str | os.PathLike, *,
                       installed_at: str | os.PathLike | None = None) -> bytes: ...

    def ready_version(self, name: str, version: str, directory: str | os.PathLike, *, by: str | None = None,
                      run_id: str | None = None) -> bytes: ...

    def download_version(self, name: str, version: str, directory: str | os.PathLike) -> bytes: ...

    def move_pointer(self, name: str, version: str, manifest: bytes, *, by: str | None = None,
                     run_id: str | None = None, action: str = "publish") -> dict[str, Any]: ...

    def prune(self, name: str) -> list[str]: ...


LockFactory = Callable[[str], AbstractContextManager[Any]]
"""``name -> context manager`` that holds artefact ``name``'s lock for every host that may change it
(:func:`inspection_refresh.compose.artefact_lock`: a named lock of the deployment database)."""


class LostToRollback(PublishError):
    """A rollback (or a pin) reached the artefact while this publish was uploading: it wins, nothing is
    published. The uploaded version stays in the channel as a kept, non-current version."""

    def __init__(self, name: str, version: str, live: str | None, by: str | None) -> None:
        self.name, self.version, self.live, self.by = name, version, live, by or "unknown"
        super().__init__(f"rolled back to {live} by {self.by} while this run was uploading; nothing published")


class Superseded(PublishError):
    """Another host made a newer version live while this publish was uploading; nothing is published."""


class Publisher(ReleasesDir):
    """Publishes versions of named directories under ``root``.

    Every change of what is live (publish, rollback, pin, unpin, prune) holds the artefact's lock,
    and re-reads the pin and the live version under it, right before the pointer moves; long work
    (uploading a version to the channel, fetching one from it) happens before the lock is taken.

    :param root, keep, releases: as for :class:`~inspection_refresh.releases_dir.ReleasesDir` (``root``: e.g.
        the CLIP index root).
    :param channel: a release channel in object storage that every publish, rollback, pin
        and unpin also goes to (``None``: this host only). Its ``current.json`` is then the live
        version and its ``pin.json`` the only pin; the local root is this host's working copy.
    :param lock: the artefact lock shared by every host that changes the artefacts (default: a
        file lock in the releases directory, which serialises the processes of one host).
    :param pins: ``False`` on a serving host, which follows ``current.json`` only: pins are neither
        read nor written there, and a stale ``.pin.json`` is removed by the next swap.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 5, releases: str | os.PathLike | None = None,
                 channel: Channel | None = None, *, lock: LockFactory | None = None, pins: bool = True) -> None:
        super().__init__(root, keep, releases)
        self.channel = channel
        self.lock = lock
        self.pins = pins
        self._held = threading.local()  # names whose lock this thread holds: nested calls do not wait on it

    def live_version(self, name: str) -> str | None:
        """The version every host should serve: the channel's ``current.json``, else this host's live link."""
        if self.channel is None:
            return self.current(name)
        pointer = self.channel.pointer(name)
        return pointer["version"] if pointer else None


    def pinned(self, name: str) -> dict[str, Any] | None:
        """The pin of ``name`` (``version``, ``pinned_by``, ``pinned_at``, ``run_id``), or ``None``.

        With a channel its ``pin.json`` is the only pin (a ``.pin.json`` left on this host is ignored);
        a serving host (``pins=False``) has none.
        """
        if not self.pins:
            return None
        if self.channel is not None:
            return self.channel.read_pin(name)
        return self._read_pin_file(name)

    def pin(self, name: str, version: str, by: str | None, run_id: str | None = None) -> dict[str, Any]:
        """Pin a kept ``version`` of ``name``: scheduled deployments leave ``name`` alone until :meth:`unpin`."""
        if not self.pins:
            raise PublishError(f"{self.releases} is a serving host's: it follows the channel's current.json and "
                               "keeps no pins; pin on an Airflow host (deployment_rollback)")
        with self._locked(name):
            kept = self.channel.versions(name) if self.channel is not None else self.versions(name)
            if version not in kept:
                raise PublishError(f"cannot pin {name!r} to {version!r}: not a kept version")
            pin = {"version": version, "pinned_by": by, "pinned_at": datetime.now(timezone.utc).isoformat(),
                   "run_id": run_id}
            self._set_pin(name, pin)
        log.info("Pinned %s to version %s (by %s)", name, version, by or "unknown")
        return pin

    def unpin(self, name: str) -> dict[str, Any] | None:
        """Remove the pin of ``name`` (on every host that shares the channel); returns the pin removed
        (``None`` if there was none)."""
        with self._locked(name):
            try:
                pin = self.pinned(name)
            except PublishError:
                pin = {"version": None, "unreadable": str(self._versions_dir(name) / PIN_FILE)}
            pin = self._set_pin(name, None) or pin
        if pin:
            log.info("Unpinned %s (was %s)", name, describe_pin(pin))
        return pin

    def published(self, name: str, version: str) -> Release | None:
        """The release of ``version`` if a publish of it already went live (a retried task whose earlier try
        swapped before it failed), with this host's live link completed; ``None`` when it is not live."""
        target = self._versions_dir(name) / version
        if self.live_version(name) != version or not target.is_dir():
            return None  # not live; or live, but not kept here: publishing the staged copy completes this host
        self.follow(name)
        log.info("%s version %s is already live (published by an earlier try)", name, version)
        return Release(name, version, target)

    def publish(self, name: str, staging: str | os.PathLike, version: str | None = None, *,
                unpin: bool = False) -> Release:
        """Make ``staging`` the live version of ``name`` atomically; prune old versions.

        A pinned ``name`` is refused unless ``unpin`` (a manual deployment replacing a rollback): then
        the pin is removed right before the pointer moves. With a channel the version is uploaded first,
        outside the lock; under it the pin and the live version are read again: a rollback or pin that
        came meanwhile wins (:class:`LostToRollback`), so does a newer version another host made live
        (:class:`Superseded`); a version already live (a retry) completes this host's link instead.
        """
        staging = Path(staging)
        versions_dir = self._versions_dir(name)
        if staging.parent.resolve() != versions_dir.resolve():
            raise PublishError(f"{staging} is not a staging directory of {name!r}; use Publisher.stage()")
        pin = self.pinned(name)
        if pin and not unpin:
            raise PublishError(f"{name} is {describe_pin(pin)}; not publishing over it (unpin it first)")
        version = check_name(version or new_version_id())
        live = self.live_version(name)
        target = versions_dir / version
        if target.exists() and live != version:
            raise PublishError(f"version {version} of {name!r} already exists at {target}")
        self._prepare()
        manifest = None
        if self.channel is not None and live != version:  # the long part, before anyone waits on the lock
            manifest = self.channel.upload_version(name, version, staging, installed_at=target)
        try:
            with self._locked(name):
                adopt_plain_directory(self, name, f"{new_version_id()}-legacy")
                now = self.live_version(name)
                if now == version:  # an earlier try (or another host with this run's version) made it live
                    self._make_live_here(name, version, staging)
                    log.info("%s version %s was already live (an earlier try, or another host, published it)", name,
                             version)
                    return Release(name, version, target)
                self._check_unchanged(name, version, (live, pin), (now, self.pinned(name)))
                self._go_live(name, version, staging, manifest, pin if unpin else None)
                log.info("Published %s version %s at %s", name, version, self.live_path(name))
                self._prune(name)
        except (LostToRollback, Superseded):
            self._follow_quietly(name)  # this host's working copy shows what won
            raise
        return Release(name, version, target)

    def follow(self, name: str) -> str | None:
        """Bring this host's working copy of ``name`` to the channel's live version (fetched from the channel,
        verified, if this host does not keep it); returns that version. Without a channel: the live one."""
        live = self.live_version(name)
        if self.channel is None or live is None or self.current(name) == live:
            return live
        if not (self._versions_dir(name) / live).is_dir():
            self._fetch(name, live)
        with self._locked(name):
            if self.live_version(name) == live and self.current(name) != live:  # not moved on meanwhile
                self._remove_leftovers(name, SWAP_PREFIX)
                self._point_to(name, live)
                log.info("%s: this host's working copy follows the release channel to version %s", name, live)
        return live

    def _follow_quietly(self, name: str) -> None:
        try:
            self.follow(name)
        except Exception as exc:  # the caller's error says what matters; the next change here follows again
            log.warning("%s: this host's working copy could not follow the release channel: %s", name, exc)

    def rollback(self, name: str, to: str | None = None, *, pinned_by: str | None = None,
                 run_id: str | None = None) -> Release:
        """Re-publish ``to`` (default: the version before the live one).

        With ``pinned_by`` the version is also pinned, so scheduled deployments do not
        replace it (what the CLI and the ``deployment_rollback`` DAG do). With a channel, a version
        this host does not keep is fetched from the channel first (checked against its manifest),
        and one the channel lacks is uploaded to it, both before the lock is taken.
        """
        if (self.root / OLD_RELEASES_DIR).is_dir():
            self._prepare()  # moves the old layout's versions first, so they can be rolled back to
        live = self.live_version(name)
        wanted = to or self._previous(name, live)
        if not SAFE_NAME.match(wanted):
            raise PublishError(f"version {wanted!r} of {name!r} is not kept: not a version id")
        directory = self._versions_dir(name) / wanted
        manifest = None
        if self.channel is not None:
            if not directory.is_dir() and wanted in self.channel.versions(name):
                self._fetch(name, wanted)
            if not directory.is_dir():
                raise PublishError(f"version {wanted!r} of {name!r} is not kept; kept versions: "
                                   f"{', '.join(self.channel.versions(name)) or 'none'}")
            self.channel.ready_version(name, wanted, directory, by=pinned_by, run_id=run_id)  # an upload: not locked
        elif wanted not in self.versions(name):
            raise PublishError(f"version {wanted!r} of {name!r} is not kept; kept versions: "
                               f"{', '.join(self.versions(name)) or 'none'}")
        with self._locked(name):
            now = self.live_version(name)
            if to is None and now != live:  # "the previous version" was worked out from another live one
                raise PublishError(f"the live version of {name!r} changed from {live} to {now} while this rollback "
                                   "prepared; nothing changed, roll back again")
            if self.channel is not None:  # again: a prune may have removed it while this waited (rarely an upload)
                manifest = self.channel.ready_version(name, wanted, directory, by=pinned_by, run_id=run_id)
            new_pin = None if pinned_by is None or not self.pins else {
                "version": wanted, "pinned_by": pinned_by, "pinned_at": datetime.now(timezone.utc).isoformat(),
                "run_id": run_id}
            self._go_live(name, wanted, None, manifest, self._pin_or_none(name) if new_pin else None,
                          new_pin=new_pin, by=pinned_by, run_id=run_id)
        log.info("Rolled %s back from %s to %s", name, now, wanted)
        if new_pin:
            log.info("Pinned %s to version %s (by %s)", name, wanted, pinned_by)
        return Release(name, wanted, directory)

    def push(self, name: str, version: str, *, by: str | None = None) -> dict[str, Any]:
        """Make this host's kept ``version`` the channel's current one (uploading it if the channel lacks it);
        the local live link is left as it is. Returns the new pointer."""
        if self.channel is None:
            raise PublishError("no release channel: set INSPECTION_PUBLISH_TARGETS to channel or both "
                               "(and --kind unless --root is a configured root)")
        directory = self._versions_dir(name) / check_name(version) if version else None
        if directory is None or not directory.is_dir():
            raise PublishError(f"{name}: version {version or '(none live)'} is not kept under {self.releases}")
        self.channel.ready_version(name, version, directory, by=by)  # the upload, if any, before the lock
        with self._locked(name):
            manifest = self.channel.ready_version(name, version, directory, by=by)
            return self.channel.move_pointer(name, version, manifest, by=by, action="push")

    # -- the critical section -------------------------------------------------------
    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Hold ``name``'s artefact lock; a thread that already holds it goes on (publish calls prune, ...)."""
        held: set[str] = self._held.__dict__.setdefault("names", set())
        if name in held:
            yield
            return
        with self.lock(name) if self.lock is not None else self._file_lock(name):
            held.add(name)
            try:
                yield
            finally:
                held.discard(name)


    def _check_unchanged(self, name: str, version: str, before: tuple[str | None, dict[str, Any] | None],
                         now: tuple[str | None, dict[str, Any] | None]) -> None:
        """Refuse the publish of ``version`` if what is live or pinned changed since it began (under the lock)."""
        (live_before, pin_before), (live, pin) = before, now
        if pin and pin != pin_before:
            raise self._lost(name, version, pin.get("version"), pin.get("pinned_by"))
        if live == live_before:
            return
        pointer = self.channel.pointer(name) if self.channel is not None else None
        if pointer and pointer.get("action") == "rollback":
            raise self._lost(name, version, live, pointer.get("published_by"))
        if live is not None and live > version:
            raise Superseded(f"version {live} of {name!r}, newer than {version}, went live "
                             f"(by {(pointer or {}).get('published_by') or 'another publish'}) while this run was "
                             "uploading; nothing published")

    def _lost(self, name: str, version: str, live: str | None, by: str | None) -> LostToRollback:
        error = LostToRollback(name, version, live, by)
        log.warning("%s: %s; version %s %s", name, error, version,
                    "stays in the channel as a kept version, not current (rolled forward to, or pruned, like any "
                    "other)" if self.channel is not None else "is discarded")
        return error

    def _go_live(self, name: str, version: str, staging: Path | None, manifest: bytes | None,
                 old_pin: dict[str, Any] | None, *, new_pin: dict[str, Any] | None = None, by: str | None = None,
                 run_id: str | None = None) -> None:
        """Under the lock: the pin (removed, or replaced by ``new_pin``), then the channel's ``current.json``,
        then this host's live link. Until the pointer moved a failure undoes the pin change and leaves the
        staged version staged; after it, the version is live whatever fails."""
        target = self._versions_dir(name) / version
        self._remove_leftovers(name, SWAP_PREFIX)
        if staging is not None:
            os.rename(staging, target)
        try:
            if old_pin or new_pin:
                self._set_pin(name, new_pin)
            if self.channel is not None:
                assert manifest is not None
                self.channel.move_pointer(name, version, manifest, by=by, run_id=run_id,
                                          action="publish" if staging is not None else "rollback")
            else:
                self._point_to(name, version)
        except BaseException:
            if old_pin or new_pin:
                self._restore_pin(name, old_pin)
            if staging is not None:
                os.rename(target, staging)  # staged again, for a retry
            raise
        if self.channel is not None:
            self._point_to(name, version)
        if self.channel is not None or not self.pins:  # a .pin.json here means nothing: not left to mislead
            self._drop_local_pin(name)

    def _set_pin(self, name: str, pin: dict[str, Any] | None) -> dict[str, Any] | None:
        """Write (``pin``) or remove (``None``) the one pin of ``name``: the channel's with a channel, else this
        host's; returns the channel's pin removed. A local ``.pin.json`` never survives a change in channel mode."""
        removed = None
        if self.channel is not None:
            if pin is None:
                removed = self.channel.remove_pin(name)
            else:
                self.channel.write_pin(name, pin)
            self._drop_local_pin(name)
        else:
            self._write_pin_file(name, pin)
        return removed

    def _pin_or_none(self, name: str) -> dict[str, Any] | None:
        """The pin to put back if a rollback fails; an unreadable one is replaced by the rollback's anyway."""
        try:
            return self.pinned(name)
        except PublishError:
            return None

    def _restore_pin(self, name: str, pin: dict[str, Any] | None) -> None:
        try:
            self._set_pin(name, pin)
        except Exception as exc:  # the original error says what failed; this one only what was left
            log.error("%s: could not restore the pin (%s) after a failed change: %s", name,
                      describe_pin(pin) if pin else "none", exc)

    def _drop_local_pin(self, name: str) -> None:
        path = self._versions_dir(name) / PIN_FILE
        if path.exists():
            log.warning("Removing %s: %s", path, "the release channel's pin.json is the only pin"
                        if self.pins else "a serving host follows the channel's current.json, not pins")
            path.unlink(missing_ok=True)

    def _previous(self, name: str, live: str | None) -> str:
        kept = self.channel.versions(name) if self.channel is not None else self.versions(name)
        older = [v for v in kept if live is None or v < live]
        if not older:
            where = "in the release channel" if self.channel is not None else f"under {self._versions_dir(name)}"
            raise PublishError(f"no version of {name!r} older than {live} is kept {where}")
        return older[-1]

    def _fetch(self, name: str, version: str) -> None:
        """Download ``version`` from the channel into this host's kept versions, verified against its manifest."""
        channel = self.channel
        assert channel is not None
        self._add_version(name, version, lambda staging: channel.download_version(name, version, staging))
        log.info("Fetched version %s of %s from the release channel into %s", version, name, self._versions_dir(name))

    def _prune(self, name: str) -> None:
        """Remove the oldest versions beyond ``keep`` (here and in the channel), but only ones older than
        the live version. Called under the artefact lock.

        After a rollback the newer versions are what an operator may roll forward to,
        so nothing newer than the live version is ever removed.
        """
        self._prune_kept(name)
        if self.channel is not None:
            try:  # under the artefact lock (publish holds it): no rollback moves the pointer meanwhile
                self.channel.prune(name)
            except Exception as exc:  # the version is live; the next publish prunes again
                log.warning("Could not prune old versions of %s from the release channel: %s", name, exc)


def cli_user() -> str:
    """Who runs the command, for the pin (``cli:<login>``)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name in some containers
        return "cli"
