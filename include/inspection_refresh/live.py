"""What is live, kept and pinned, and a version's small files, read from where the truth is.

With a release channel (``INSPECTION_PUBLISH_TARGETS`` = ``channel`` or ``both``) the channel's
``current.json``, its complete versions, its ``pin.json`` and the files under a version prefix are
the truth, on every host; local roots are working copies (the API server of a Celery set-up has
none at all). Without a channel the local root is all there is. The Deployments console, the
rollback DAG and the "unchanged, stays live" checks read through :class:`Releases`, so they agree
with what serving hosts install.

Reads are memoised per instance, and after one storage error every further channel read of the
instance fails at once with it (a page of cards waits for one unreachable endpoint, not one per
card): make one instance per page or task, never one per process, since another host may move
``current.json`` at any time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from inspection_refresh.channel import ReleaseChannel
from inspection_refresh.publish import Publisher, check_name
from inspection_refresh.storage import StorageError

T = TypeVar("T")


class Releases:
    """The live version, kept versions, pin and small version files of one publisher's artefacts.

    :param publisher: the root's publisher; its channel (if a :class:`ReleaseChannel`) is the truth.
    """

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        channel = publisher.channel
        self.channel: ReleaseChannel | None = channel if isinstance(channel, ReleaseChannel) else None
        self._memo: dict[tuple[str, ...], Any] = {}
        self._unreachable: StorageError | None = None

    def _once(self, key: tuple[str, ...], read: Callable[[], T]) -> T:
        if key not in self._memo:
            if self._unreachable is not None:
                raise self._unreachable
            try:
                self._memo[key] = read()
            except StorageError as exc:
                self._unreachable = exc
                raise
        return self._memo[key]

    @property
    def unreachable(self) -> StorageError | None:
        """The storage error that made this instance give up on the channel, if one did."""
        return self._unreachable

    @property
    def where(self) -> str:
        """Where the truth is, for messages: the channel's ``s3://`` prefix, or the releases directory."""
        if self.channel is None:
            return str(self.publisher.releases)
        return self.channel.url(f"{self.channel.prefix}{self.channel.kind}/")

    def names(self) -> list[str]:
        """Published names: those with a ``current.json`` in the channel, and those this host keeps versions
        of (a version published before the channel was switched on is still shown, and can be pushed)."""
        if self.channel is None:
            return self.publisher.names()
        return sorted(set(self._once(("names",), self.channel.names)) | set(self.publisher.names()))

    def pointer(self, name: str) -> dict[str, Any] | None:
        """The channel's ``current.json`` of ``name`` (``None`` without a channel or a pointer)."""
        channel = self.channel
        if channel is None:
            return None
        return self._once(("pointer", name), lambda: channel.pointer(name))

    def current(self, name: str) -> str | None:
        """The live version of ``name``: the channel's ``current.json``, else this host's live link."""
        if self.channel is None:
            return self.publisher.current(name)
        pointer = self.pointer(name)
        return pointer["version"] if pointer else None

    def versions(self, name: str) -> list[str]:
        """Kept versions of ``name``, oldest first: the channel's complete ones, else this host's."""
        channel = self.channel
        if channel is None:
            return self.publisher.versions(name)
        return self._once(("versions", name), lambda: channel.versions(name))

    def pinned(self, name: str) -> dict[str, Any] | None:
        """The pin of ``name``: the channel's ``pin.json``, else this host's ``.pin.json``."""
        channel = self.channel
        if channel is None:
            return self.publisher.pinned(name)
        return self._once(("pin", name), lambda: channel.read_pin(name))

    def read_file(self, name: str, version: str, relative_path: str) -> bytes | None:
        """One small file of a published version (``bank_config.json``, ``manifest.json``), or ``None``
        if the version lacks it: from the channel's version prefix, else this host's kept version."""
        channel = self.channel
        if channel is not None:
            return self._once(("file", name, version, relative_path),
                              lambda: channel.read_version_file(name, version, relative_path))
        version_dir = self.publisher.releases / check_name(name) / check_name(version)
        path = Path(os.path.realpath(version_dir / relative_path))
        if Path(os.path.realpath(version_dir)) not in path.parents:
            return None  # a link out of the version is not part of it
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def local_copy(self, name: str, version: str) -> Path | None:
        """This host's kept copy of ``version`` of ``name`` (a working copy in channel mode), if it has one."""
        path = self.publisher.releases / check_name(name) / check_name(version)
        return path if path.is_dir() else None
