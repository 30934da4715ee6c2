"""Listed objects, and the one rule that turns an untrusted object key into a local path."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from inspection_refresh.storage.errors import UnsafeKeyError


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None = field(default=None, compare=False)
    """When the object was last written, as the listing says (``None`` when not listed)."""

    @property
    def is_folder_marker(self) -> bool:
        """Zero-byte ``.../`` objects that the service's upload pages create as folders."""
        return self.key.endswith("/")


def is_safe_relative_key(relative: str) -> bool:
    """Whether ``relative`` (a key below a prefix) names a path inside a directory.

    Refused: empty, ``..``, ``.`` or empty segments, an absolute or Windows path
    (``/x``, ``\\``, ``C:``) and NUL bytes.
    """
    parts = relative.split("/")
    return not (
        not relative
        or relative.startswith("/")
        or "\\" in relative
        or "\x00" in relative
        or any(p in ("", ".", "..") for p in parts)
        or (len(parts[0]) >= 2 and parts[0][1] == ":")
    )


def local_path_for_key(key: str, prefix: str, local_dir: Path) -> Path:
    """Map ``prefix + relative`` to ``local_dir / relative``, refusing any escape.

    Object keys are untrusted: a key with ``..`` segments, an absolute or Windows
    path, a NUL byte or an empty segment raises :class:`UnsafeKeyError`.
    """
    if not key.startswith(prefix):
        raise UnsafeKeyError(f"object key {key!r} is not under prefix {prefix!r}")
    relative = key[len(prefix):]
    if not is_safe_relative_key(relative):
        raise UnsafeKeyError(
            f"refusing object key {key!r}: it would be written outside {local_dir} "
            "(keys must not contain '..', '.', empty or absolute segments); rename the object"
        )
    target = local_dir.joinpath(*PurePosixPath(relative).parts)
    base = local_dir.resolve()
    if not target.resolve().is_relative_to(base):  # e.g. through a symlinked sub-directory
        raise UnsafeKeyError(f"refusing object key {key!r}: it resolves outside {local_dir}")
    return target
