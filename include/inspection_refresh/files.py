"""Atomic file writes: a reader (or a crash) never sees a half-written file under its final name; and
the digest of a tree of files (what an approval names)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The temporary file is in the same directory (so the rename is atomic), gets the
    usual permissions (not mkstemp's 0600) and is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2, fsync: bool = True) -> Path:
    """Write ``data`` as UTF-8 JSON atomically (``default=str`` for dates and paths)."""
    text = json.dumps(data, ensure_ascii=False, indent=indent, default=str, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Hard-link ``source`` to ``target`` (free on one filesystem), else copy it."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_tree_linked(source: Path, target: Path, ignore: Callable | None = None) -> None:
    """Copy the directory ``source`` to ``target`` with :func:`link_or_copy` for each file."""
    shutil.copytree(source, target, copy_function=link_or_copy, ignore=ignore)


def tree_paths(directory: str | os.PathLike, *, skip: Iterable[str] = ()) -> dict[str, Path]:
    """Every file under ``directory`` by relative POSIX path, leaving out the top-level entries ``skip``;
    symlinked directories are not followed."""
    directory, skipped = Path(directory), set(skip)
    files: dict[str, Path] = {}
    for folder, sub_dirs, names in os.walk(directory):
        if Path(folder) == directory:
            sub_dirs[:] = [d for d in sub_dirs if d not in skipped]
            names = [n for n in names if n not in skipped]
        for name in names:
            files[(Path(folder) / name).relative_to(directory).as_posix()] = Path(folder) / name
    return files


def tree_files(directory: str | os.PathLike, *, skip: Iterable[str] = ()) -> dict[str, tuple[int, str]]:
    """Size and sha256 of every file of :func:`tree_paths`, by relative POSIX path."""
    files = {}
    for relative, path in tree_paths(directory, skip=skip).items():
        with open(path, "rb") as handle:
            files[relative] = (path.stat().st_size, hashlib.file_digest(handle, "sha256").hexdigest())
    return files


def tree_digest(files: Mapping[str, tuple[int, str]]) -> str:
    """The sha256 of a sorted manifest of ``(path, size, sha256)`` lines: one name for exactly these files."""
    digest = hashlib.sha256()
    for relative in sorted(files):
        size, sha256 = files[relative]
        digest.update(f"{relative}\t{size}\t{sha256}\n".encode())
    return digest.hexdigest()
