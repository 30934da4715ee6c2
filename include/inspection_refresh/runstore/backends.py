"""The two run-store backends: where a pipeline's runs keep their files, and how a task hands work on.

Each backend is one object, chosen once per run by :meth:`~inspection_refresh.runstore.RunStore.for_run`:

* :class:`LocalRuns` (``local``): every task of a run works on this host's disk, in the run's work
  directory; what a task writes stays where it wrote it.
* :class:`StorageRuns` (``storage``): key prefixes in object storage; each task may run on another
  worker, so what a task keeps is uploaded and what a later task needs is downloaded to its worker.

Both store, fetch, list and delete one run's files (names relative to the run), and both implement the
hand-over that :class:`~inspection_refresh.runstore.RunStore` offers the tasks (``writing``, ``keep_dir``,
``fetch_dir`` ...): there, and only there, the two backends differ.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

from inspection_refresh.files import atomic_write, tree_files
from inspection_refresh.progress import counted
from inspection_refresh.runstore.mirror import materialise_images
from inspection_refresh.runstore.names import KEPT_AT, RunFileMissing
from inspection_refresh.storage import ObjectNotFoundError, ObjectStorage, local_path_for_key, require_complete

log = logging.getLogger(__package__)  # one logger for the run store, as before it was a package

T = TypeVar("T")


class Served(Protocol):
    """What a backend's hand-over asks of the run store it serves (names relative to that store)."""

    run: str
    folder: str

    def put_file(self, name: str, source: str | os.PathLike) -> None: ...
    def get_file(self, name: str, target: str | os.PathLike) -> Path: ...
    def put_dir(self, name: str, source: str | os.PathLike, *, skip: Iterable[str] = ()) -> int: ...
    def get_dir(self, name: str, target: str | os.PathLike) -> Path: ...
    def stored_files(self, name: str) -> dict[str, tuple[int, str]] | None: ...
    def exists(self, name: str) -> bool: ...
    def within(self, folder: str) -> Any: ...
    def at(self, work_dir: str | os.PathLike) -> Any: ...


class Runs(Protocol):
    """A backend: the runs of one pipeline, each a flat set of files named by relative POSIX paths,
    and how a task of a run hands its work to the next (see :class:`~inspection_refresh.runstore.RunStore`)."""

    name: str
    transfers: int

    def describe(self, run: str, name: str = "") -> str: ...
    def local_dir(self, run: str, folder: str) -> Path | None: ...
    def put_bytes(self, run: str, name: str, data: bytes) -> None: ...
    def get_bytes(self, run: str, name: str) -> bytes: ...
    def put_file(self, run: str, name: str, source: Path) -> None: ...
    def get_file(self, run: str, name: str, target: Path) -> None: ...
    def names(self, run: str, prefix: str = "") -> list[str]: ...
    def delete(self, run: str, names: Iterable[str]) -> None: ...
    def runs(self) -> dict[str, float]: ...
    def remove_run(self, run: str) -> None: ...

    def writing(self, store: Served, name: str) -> AbstractContextManager[Path]: ...
    def reading(self, store: Served, name: str) -> AbstractContextManager[Path]: ...
    def keep_file(self, store: Served, name: str, path: Path) -> None: ...
    def workspace(self, store: Served, scratch: Path) -> Path: ...
    def release(self, path: Path, remove: Callable[[Path], None]) -> None: ...
    def keep_dir(self, store: Served, name: str, directory: Path, skip: Iterable[str]) -> dict[str, str]: ...
    def fetch_dir(self, store: Served, name: str, kept: dict[str, Any], make: Callable[[], Path],
                  refill: Callable[[Path], None] | None, discard: Callable[[Path], None],
                  keep_in_place: bool) -> AbstractContextManager[Path]: ...
    def find_dir(self, store: Served, name: str, kept: dict[str, Any], done: str) -> Any: ...
    def kept_files(self, store: Served, name: str, kept: dict[str, Any],
                   skip: tuple[str, ...]) -> dict[str, tuple[int, str]]: ...
    def fetch_images(self, storage: ObjectStorage, prefix: str, images: list[dict[str, Any]],
                     mirror_dir: Path) -> dict[str, Path]: ...
    def settle_ahead(self, settle: Callable[[], T], otherwise: T) -> T: ...
    def settle_here(self, settle: Callable[[], None]) -> None: ...


class LocalRuns:
    """Runs as directories ``<root>/<run>/`` on this host's disk (today's work directories)."""

    name = "local"
    transfers = 1

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self, run: str, name: str = "") -> str:
        return str(self.root / run / name) if name else str(self.root / run)

    def local_dir(self, run: str, folder: str) -> Path | None:
        return Path(self.describe(run, folder))

    def _path(self, run: str, name: str) -> Path:
        # Also refuses a name that resolves outside the run through a symlinked sub-directory.
        return local_path_for_key(name, "", self.root / run)

    def put_bytes(self, run: str, name: str, data: bytes) -> None:
        atomic_write(self._path(run, name), lambda tmp: tmp.write_bytes(data), fsync=False)

    def get_bytes(self, run: str, name: str) -> bytes:
        try:
            return self._path(run, name).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise RunFileMissing(f"run file {self.describe(run, name)} does not exist") from None

    def put_file(self, run: str, name: str, source: Path) -> None:
        atomic_write(self._path(run, name), lambda tmp: shutil.copyfile(source, tmp), fsync=False)

    def get_file(self, run: str, name: str, target: Path) -> None:
        stored = self._path(run, name)
        if not stored.is_file():
            raise RunFileMissing(f"run file {self.describe(run, name)} does not exist")
        atomic_write(target, lambda tmp: shutil.copyfile(stored, tmp), fsync=False)

    def names(self, run: str, prefix: str = "") -> list[str]:
        """Stored names starting with ``prefix`` (a plain string prefix, as in an object listing)."""
        base = self.root / run
        names = []
        for directory, _, files in os.walk(base / prefix.rpartition("/")[0]):
            for file_name in files:
                name = (Path(directory) / file_name).relative_to(base).as_posix()
                if name.startswith(prefix):
                    names.append(name)
        return sorted(names)

    def delete(self, run: str, names: Iterable[str]) -> None:
        for name in names:
            self._path(run, name).unlink(missing_ok=True)

    def runs(self) -> dict[str, float]:
        """Run -> when anything in it was last written (the newest mtime of the directory and its files)."""
        ages = {}
        for entry in (self.root.iterdir() if self.root.is_dir() else ()):
            if entry.is_dir() and not entry.is_symlink():
                try:
                    times = [entry.stat().st_mtime]
                    for directory, _, files in os.walk(entry):
                        times += [os.stat(Path(directory) / f, follow_symlinks=False).st_mtime for f in files]
                except FileNotFoundError:  # removed meanwhile (another run's sweep, its own remove_run)
                    continue
                ages[entry.name] = max(times)
        return ages

    def remove_run(self, run: str) -> None:
        shutil.rmtree(self.root / run, ignore_errors=True)

    # -- hand-over: every task of the run sees this disk, so what a task wrote stays where it is ----------
    def _own(self, store: Served, name: str) -> Path:
        return self._path(store.run, store.folder + name)

    @contextmanager
    def writing(self, store: Served, name: str) -> Iterator[Path]:
        path = self._own(store, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path

    @contextmanager
    def reading(self, store: Served, name: str) -> Iterator[Path]:
        yield self._own(store, name)

    def keep_file(self, store: Served, name: str, path: Path) -> None:
        if path.resolve() != self._own(store, name).resolve():
            store.put_file(name, path)

    def workspace(self, store: Served, scratch: Path) -> Path:
        directory = self.root / store.run / store.folder
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def release(self, path: Path, remove: Callable[[Path], None]) -> None:
        pass  # what the run keeps, where later tasks find it

    def keep_dir(self, store: Served, name: str, directory: Path, skip: Iterable[str]) -> dict[str, str]:
        return {KEPT_AT: str(directory)}

    @contextmanager
    def fetch_dir(self, store: Served, name: str, kept: dict[str, Any], make: Callable[[], Path],
                  refill: Callable[[Path], None] | None, discard: Callable[[Path], None],
                  keep_in_place: bool) -> Iterator[Path]:
        directory = Path(kept[KEPT_AT])
        try:
            yield directory
        except BaseException:
            if not keep_in_place:
                discard(directory)
            raise

    def find_dir(self, store: Served, name: str, kept: dict[str, Any], done: str) -> Any:
        directory = Path(kept.get(KEPT_AT, ""))
        return store.at(directory) if (directory / done).is_file() else None

    def kept_files(self, store: Served, name: str, kept: dict[str, Any],
                   skip: tuple[str, ...]) -> dict[str, tuple[int, str]]:
        directory = Path(kept.get(KEPT_AT, ""))
        if not kept.get(KEPT_AT) or not directory.is_dir():
            raise RunFileMissing(f"the directory kept as {name!r} ({directory}) is gone; rerun the task that built it")
        return tree_files(directory, skip=skip)

    def fetch_images(self, storage: ObjectStorage, prefix: str, images: list[dict[str, Any]],
                     mirror_dir: Path) -> dict[str, Path]:
        return {item["key"]: Path(item["path"]) for item in images}  # the download's mirror, on this disk

    def settle_ahead(self, settle: Callable[[], T], otherwise: T) -> T:
        return settle()

    def settle_here(self, settle: Callable[[], None]) -> None:
        pass  # settled ahead, by the task that prepared this one


class StorageRuns:
    """Runs as key prefixes ``<prefix><run>/`` in the bucket of an :class:`ObjectStorage`."""

    name = "storage"

    def __init__(self, storage: ObjectStorage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix
        self.transfers = storage.max_transfers

    def _key(self, run: str, name: str = "") -> str:
        return f"{self.prefix}{run}/{name}"

    def describe(self, run: str, name: str = "") -> str:
        return f"s3://{self.storage.bucket}/{self._key(run, name)}"

    def local_dir(self, run: str, folder: str) -> Path | None:
        return None

    def put_bytes(self, run: str, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="runstore-") as scratch:
            source = Path(scratch) / "body"
            source.write_bytes(data)
            self.storage.upload_file(source, self._key(run, name))

    def get_bytes(self, run: str, name: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="runstore-") as scratch:
            target = Path(scratch) / "body"
            self.get_file(run, name, target)
            return target.read_bytes()

    def put_file(self, run: str, name: str, source: Path) -> None:
        self.storage.upload_file(source, self._key(run, name))

    def get_file(self, run: str, name: str, target: Path) -> None:
        try:
            self.storage.download_file(self._key(run, name), target)  # retried, atomic, length-checked
        except ObjectNotFoundError:
            raise RunFileMissing(f"run file {self.describe(run, name)} does not exist") from None

    def names(self, run: str, prefix: str = "") -> list[str]:
        base = self._key(run)
        return [obj.key[len(base):] for obj in self.storage.list_objects(base + prefix, include_folders=True)]

    def delete(self, run: str, names: Iterable[str]) -> None:
        for name in names:
            self.storage.delete_file(self._key(run, name))

    def runs(self) -> dict[str, float]:
        """Run -> when its newest object was written (LastModified), from one ListObjects V1 listing."""
        ages: dict[str, float] = {}
        for obj in self.storage.list_objects(self.prefix, include_folders=True):
            run = obj.key[len(self.prefix):].split("/", 1)[0]
            written = obj.last_modified.timestamp() if obj.last_modified else time.time()
            ages[run] = max(ages.get(run, written), written)
        return ages

    def remove_run(self, run: str) -> None:
        self.delete(run, self.names(run))

    # -- hand-over: a later task may run on another worker, so what a task keeps goes to the bucket -------
    @contextmanager
    def writing(self, store: Served, name: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="runstore-") as scratch:
            path = Path(scratch) / PurePosixPath(name).name  # the name's suffix too (np.save adds .npy)
            yield path
            store.put_file(name, path)

    @contextmanager
    def reading(self, store: Served, name: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="runstore-") as scratch:
            yield store.get_file(name, Path(scratch) / PurePosixPath(name).name)

    def keep_file(self, store: Served, name: str, path: Path) -> None:
        store.put_file(name, path)

    def workspace(self, store: Served, scratch: Path) -> Path:
        shutil.rmtree(scratch, ignore_errors=True)  # what an earlier try left
        scratch.mkdir(parents=True)
        return scratch

    def release(self, path: Path, remove: Callable[[Path], None]) -> None:
        remove(path)

    def keep_dir(self, store: Served, name: str, directory: Path, skip: Iterable[str]) -> dict[str, str]:
        store.put_dir(name, directory, skip=skip)
        return {}

    @contextmanager
    def fetch_dir(self, store: Served, name: str, kept: dict[str, Any], make: Callable[[], Path],
                  refill: Callable[[Path], None] | None, discard: Callable[[Path], None],
                  keep_in_place: bool) -> Iterator[Path]:
        directory = make()
        try:
            store.get_dir(name, directory)
            if refill is not None:
                refill(directory)
            yield directory
        except BaseException:  # fetched anew by each try; never left behind
            discard(directory)
            raise

    def find_dir(self, store: Served, name: str, kept: dict[str, Any], done: str) -> Any:
        return store.within(name) if store.exists(name) else None

    def kept_files(self, store: Served, name: str, kept: dict[str, Any],
                   skip: tuple[str, ...]) -> dict[str, tuple[int, str]]:
        files = store.stored_files(name)
        if files is None:  # stored by an older version: fetch and hash it once
            with tempfile.TemporaryDirectory(prefix="runstore-") as scratch:
                return tree_files(store.get_dir(name, scratch), skip=skip)
        return {relative: entry for relative, entry in files.items() if relative.split("/", 1)[0] not in skip}

    def fetch_images(self, storage: ObjectStorage, prefix: str, images: list[dict[str, Any]],
                     mirror_dir: Path) -> dict[str, Path]:
        result = materialise_images(storage, prefix, images, mirror_dir)
        require_complete(result)
        log.info("This worker's mirror %s holds the run's %s (%d downloaded, %d already here)", mirror_dir,
                 counted(len(result.files), "image"), result.downloaded, result.unchanged)
        return result.files

    def settle_ahead(self, settle: Callable[[], T], otherwise: T) -> T:
        return otherwise  # the later task settles its own, on its worker

    def settle_here(self, settle: Callable[[], None]) -> None:
        settle()
