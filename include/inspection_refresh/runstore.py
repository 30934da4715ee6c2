"""A run's hand-over area: what one task of a run gives the next, on a local disk or in object storage.

XCom carries small dicts; everything else a task hands to the next task of its run (the image
inventory, ``vectors.npy``, stage records, a built bank or index version) goes through the run's
:class:`RunStore`. ``INSPECTION_RUN_STORE`` picks where it lives:

* ``local`` (default, a single host): the run's work directory,
  ``<INSPECTION_CACHE_ROOT>/<pipeline>/runs/<run>/``; every task of the run must see that disk.
* ``storage``: object storage, ``<INSPECTION_RUN_STORE_PREFIX><pipeline>/<run>/<name>`` in the bucket,
  through :class:`~inspection_refresh.storage.ObjectStorage` (NCP-safe client, ListObjects V1), so each
  task of a run may run on another Celery worker with no shared disk.

Both backends are the same class; a backend only stores, fetches, lists and deletes one run's
files (:class:`_LocalRuns`, :class:`_StorageRuns`). Names are relative POSIX paths
(``vectors.npy``, ``BRKT01/stage-download.json``); one that could leave its run (``..``, an absolute
path, empty segments) is refused with :class:`UnsafeNameError`. Every write is atomic per file, and a
directory (:meth:`RunStore.put_dir`) counts as present only once its manifest is written, so a task
killed half-way never hands a partial file or tree to the next one.

Image mirrors and the embedding cache stay per-worker caches: :func:`materialise_images` brings
this worker's mirror to exactly a run's inventory, downloading only what is missing or changed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from inspection_refresh.config import Settings, get_settings
from inspection_refresh.files import atomic_write
from inspection_refresh.progress import counted
from inspection_refresh.storage import (
    ObjectInfo, ObjectNotFoundError, ObjectStorage, SyncResult, UnsafeKeyError, is_safe_relative_key,
    local_path_for_key, plan_mirror,
)
from inspection_refresh.tasks.common import run_work_dir, safe_run_id

log = logging.getLogger(__name__)

BACKENDS = ("local", "storage")
DIR_MANIFEST = ".runstore-manifest.json"
"""Written last into a stored directory: names and sizes of its files. Without it the directory is absent."""


class RunStoreError(RuntimeError):
    """A run store was misconfigured or asked for something it cannot do."""


class UnsafeNameError(RunStoreError, ValueError):
    """A name would leave the run (``..``, absolute, empty or ``.`` segments, backslashes, NUL)."""


class RunFileMissing(RunStoreError, FileNotFoundError):
    """The run has no such file (or no complete directory of that name)."""


class _Runs(Protocol):
    """A backend: the runs of one pipeline, each a flat set of files named by relative POSIX paths."""

    transfers: int

    def describe(self, run: str, name: str = "") -> str: ...
    def put_bytes(self, run: str, name: str, data: bytes) -> None: ...
    def get_bytes(self, run: str, name: str) -> bytes: ...
    def put_file(self, run: str, name: str, source: Path) -> None: ...
    def get_file(self, run: str, name: str, target: Path) -> None: ...
    def names(self, run: str, prefix: str = "") -> list[str]: ...
    def delete(self, run: str, names: Iterable[str]) -> None: ...
    def runs(self) -> dict[str, float]: ...
    def remove_run(self, run: str) -> None: ...


class _LocalRuns:
    """Runs as directories ``<root>/<run>/`` on this host's disk (today's work directories)."""

    transfers = 1

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self, run: str, name: str = "") -> str:
        return str(self.root / run / name) if name else str(self.root / run)

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


class _StorageRuns:
    """Runs as key prefixes ``<prefix><run>/`` in the bucket of an :class:`ObjectStorage`."""

    def __init__(self, storage: ObjectStorage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix
        self.transfers = storage.max_transfers

    def _key(self, run: str, name: str = "") -> str:
        return f"{self.prefix}{run}/{name}"

    def describe(self, run: str, name: str = "") -> str:
        return f"s3://{self.storage.bucket}/{self._key(run, name)}"

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


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not is_safe_relative_key(name):
        raise UnsafeNameError(f"refusing run file name {name!r}: use a relative path without '..', '.', "
                              "empty or absolute segments (e.g. 'vectors.npy', 'BRKT01/stage-build.json')")
    return name


def _check_component(what: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", value or "") or value in (".", ".."):
        raise UnsafeNameError(f"{what} {value!r} cannot name a run store folder (letters, digits, '.', '_', '-')")
    return value


def _storage_prefix(prefix: str) -> str:
    """``airflow-runs`` -> ``airflow-runs/``; empty stays empty (the bucket's top level)."""
    prefix = prefix.strip().strip("/")
    if prefix and not is_safe_relative_key(prefix):
        raise UnsafeNameError(f"INSPECTION_RUN_STORE_PREFIX {prefix!r} is not a usable key prefix")
    return f"{prefix}/" if prefix else ""


class RunStore:
    """The files one run's tasks hand each other; build one with :meth:`for_run` (or :meth:`at`).

    :param runs: the backend (all runs of one pipeline).
    :param run: this run's folder in it (a safe run id).
    :param retention_days: :meth:`sweep`'s default age (``INSPECTION_RUN_RETENTION_DAYS``).
    :param folder: ``""``, or the folder (ending in ``/``) of the run that names are relative to (:meth:`within`).
    """

    def __init__(self, runs: _Runs, run: str, *, retention_days: float = 14.0, folder: str = "") -> None:
        self._runs = runs
        self.run = run
        self.retention_days = retention_days
        self.folder = folder

    # -- construction ---------------------------------------------------------------
    @classmethod
    def for_run(
        cls, pipeline: str, run_id: str, settings: Settings | None = None, *, storage: ObjectStorage | None = None,
    ) -> RunStore:
        """The store of ``run_id`` (any Airflow run id, or a key such as ``normal-<run id>``) of ``pipeline``.

        The backend is ``settings.run_store``: ``local`` keeps today's work directory
        (:func:`~inspection_refresh.tasks.common.run_work_dir`), ``storage`` uses ``storage`` (default:
        the settings' connection and bucket) under ``settings.run_store_prefix``.
        """
        settings = settings or get_settings()
        _check_component("pipeline", pipeline)
        run = _check_component("run", safe_run_id(run_id))
        if settings.run_store == "local":
            work_dir = run_work_dir(settings.cache_root, pipeline, run_id)
            return cls(_LocalRuns(work_dir.parent), run, retention_days=settings.run_retention_days)
        if settings.run_store == "storage":
            storage = storage or ObjectStorage(settings.storage_conn_id)
            runs = _StorageRuns(storage, f"{_storage_prefix(settings.run_store_prefix)}{pipeline}/")
            return cls(runs, run, retention_days=settings.run_retention_days)
        raise RunStoreError(f"INSPECTION_RUN_STORE must be one of {', '.join(BACKENDS)}, not {settings.run_store!r}")

    def within(self, folder: str) -> RunStore:
        """The same run with names relative to ``folder`` (e.g. a product's ``BRKT01``): its files are
        ``folder/<name>``. :meth:`remove_run` and :meth:`sweep` still act on whole runs."""
        return RunStore(self._runs, self.run, retention_days=self.retention_days,
                        folder=f"{self.folder}{_check_name(folder)}/")

    @classmethod
    def at(cls, work_dir: str | os.PathLike) -> RunStore:
        """A local store over an existing work directory (how :mod:`.tasks.stages` takes a plain path)."""
        work_dir = Path(work_dir)
        return cls(_LocalRuns(work_dir.parent), work_dir.name, retention_days=get_settings().run_retention_days)

    # -- where ------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``local`` or ``storage``."""
        return "local" if isinstance(self._runs, _LocalRuns) else "storage"

    @property
    def location(self) -> str:
        """The run's (or :meth:`within` folder's) directory or ``s3://bucket/prefix/``, for log lines."""
        return self._runs.describe(self.run, self.folder)

    @property
    def local_dir(self) -> Path | None:
        """The run's (or :meth:`within` folder's) directory with the ``local`` backend, else ``None``."""
        return Path(self.location) if isinstance(self._runs, _LocalRuns) else None

    def __repr__(self) -> str:
        return f"RunStore({self.backend}: {self.location})"

    # -- files ------------------------------------------------------------------------
    def _name(self, name: str) -> str:
        """The run-relative name of ``name`` (refused if it could leave the run)."""
        return self.folder + _check_name(name)

    def write_json(self, name: str, data: Any) -> None:
        """Store ``data`` as UTF-8 JSON (``default=str`` for dates and paths) under ``name``."""
        self._write_json(self._name(name), data)

    def read_json(self, name: str) -> Any:
        """The JSON stored under ``name``; :class:`RunFileMissing` if there is none."""
        return self._read_json(self._name(name))

    def _write_json(self, run_name: str, data: Any) -> None:
        text = json.dumps(data, ensure_ascii=False, indent=1, default=str) + "\n"
        self._runs.put_bytes(self.run, run_name, text.encode("utf-8"))

    def _read_json(self, run_name: str) -> Any:
        return json.loads(self._runs.get_bytes(self.run, run_name))

    def read_text(self, name: str) -> str:
        """The text (UTF-8, undecodable bytes replaced) stored under ``name``; :class:`RunFileMissing` if none."""
        return self._runs.get_bytes(self.run, self._name(name)).decode("utf-8", errors="replace")

    def put_file(self, name: str, source: str | os.PathLike) -> None:
        """Store a copy of the local file ``source`` under ``name`` (e.g. ``vectors.npy``)."""
        source = Path(source)
        if not source.is_file():
            raise FileNotFoundError(f"cannot store {source} as run file {name!r}: it is not a file")
        self._runs.put_file(self.run, self._name(name), source)

    def get_file(self, name: str, target: str | os.PathLike) -> Path:
        """Write the file stored under ``name`` to ``target`` (atomically); return ``target``."""
        target = Path(target)
        self._runs.get_file(self.run, self._name(name), target)
        return target

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a stored file or a complete stored directory."""
        name = self._name(name)
        stored = set(self._runs.names(self.run, name))
        return name in stored or f"{name}/{DIR_MANIFEST}" in stored

    # -- directories ----------------------------------------------------------------------
    def put_dir(self, name: str, source: str | os.PathLike, *, skip: Iterable[str] = ()) -> int:
        """Store the tree under the local directory ``source`` as ``name``, replacing what was there.

        Files are stored first, then the manifest; files of an earlier put that the new tree
        lacks are removed afterwards. Symlinked directories are not followed. Returns the
        number of files.

        :param skip: top-level entries of ``source`` to leave out (e.g. a CLIP version's ``images``).
        """
        name, source = self._name(name), Path(source)
        if not source.is_dir():
            raise FileNotFoundError(f"cannot store {source} as run directory {name!r}: it is not a directory")
        skipped = set(skip)
        files: dict[str, Path] = {}
        for directory, sub_dirs, file_names in os.walk(source):
            if Path(directory) == source:
                sub_dirs[:] = [d for d in sub_dirs if d not in skipped]
                file_names = [f for f in file_names if f not in skipped]
            for file_name in file_names:
                path = Path(directory) / file_name
                relative = path.relative_to(source).as_posix()
                if relative == DIR_MANIFEST or not is_safe_relative_key(relative):
                    raise UnsafeNameError(f"cannot store {path} in run directory {name!r}: unusable name")
                files[relative] = path
        manifest = f"{name}/{DIR_MANIFEST}"
        self._runs.delete(self.run, [manifest])  # incomplete while it is rewritten
        self._each(lambda item: self._runs.put_file(self.run, f"{name}/{item[0]}", item[1]), list(files.items()))
        self._write_json(manifest, {"files": {relative: path.stat().st_size for relative, path in files.items()}})
        keep = {f"{name}/{relative}" for relative in files} | {manifest}
        self._runs.delete(self.run, [n for n in self._runs.names(self.run, f"{name}/") if n not in keep])
        log.info("Stored %s as %s", counted(len(files), "file"), self._runs.describe(self.run, name + "/"))
        return len(files)

    def get_dir(self, name: str, target: str | os.PathLike) -> Path:
        """Write the stored directory ``name`` into the local directory ``target``; return ``target``.

        Raises :class:`RunFileMissing` when no complete directory of that name was stored.
        Files already in ``target`` that the tree lacks are left alone.
        """
        name, target = self._name(name), Path(target)
        try:
            listed: dict[str, int] = self._read_json(f"{name}/{DIR_MANIFEST}")["files"]
        except RunFileMissing:
            raise RunFileMissing(f"no complete run directory {self._runs.describe(self.run, name + '/')} "
                                 "(never stored, or its task stopped while storing it)") from None
        target.mkdir(parents=True, exist_ok=True)
        paths = {relative: local_path_for_key(_check_name(relative), "", target) for relative in listed}

        def fetch(relative: str) -> None:
            self._runs.get_file(self.run, f"{name}/{relative}", paths[relative])
            if paths[relative].stat().st_size != listed[relative]:
                raise RunStoreError(f"run file {self._runs.describe(self.run, f'{name}/{relative}')} has "
                                    f"{paths[relative].stat().st_size} bytes, its manifest says {listed[relative]}")

        self._each(fetch, list(paths))
        return target

    def _each(self, work: Callable[[Any], None], items: list) -> None:
        """``work(item)`` for every item, several at once where the backend transfers in parallel."""
        if self._runs.transfers <= 1 or len(items) <= 1:
            for item in items:
                work(item)
            return
        with ThreadPoolExecutor(min(self._runs.transfers, len(items)), thread_name_prefix="runstore") as pool:
            for _ in pool.map(work, items):
                pass

    # -- housekeeping -------------------------------------------------------------------
    def remove_run(self) -> None:
        """Delete everything this run stored (a completed run's last step)."""
        self._runs.remove_run(self.run)
        log.info("Removed the run files of %s", self.location)

    def sweep(self, older_than_days: float | None = None, *, now: float | None = None) -> list[str]:
        """Delete the other runs of this pipeline not written to for ``older_than_days`` days.

        A run's age is that of its newest file or object, so a run still writing is never
        swept; this run is never swept. Default age: ``INSPECTION_RUN_RETENTION_DAYS``.
        Returns the swept runs.

        :param now: unix time to measure ages from (default: now).
        """
        days = self.retention_days if older_than_days is None else older_than_days
        cutoff = (time.time() if now is None else now) - days * 86400
        swept = []
        for run, written in sorted(self._runs.runs().items()):
            if run != self.run and written < cutoff:
                self._runs.remove_run(run)
                swept.append(run)
        if swept:
            log.info("Swept %s older than %g days: %s", counted(len(swept), "run"), days, ", ".join(swept))
        return swept


def materialise_images(
    storage: ObjectStorage, prefix: str, inventory: list[dict[str, Any]], mirror_dir: str | os.PathLike,
) -> SyncResult:
    """Bring this worker's mirror of ``prefix`` to exactly the images of a run's ``inventory``.

    ``inventory`` holds ``{"key", "etag", "size", ...}`` per image (what the run's ``download``
    listed; other fields, such as another worker's ``path``, are ignored). Through
    :meth:`ObjectStorage.sync_prefix` and its per-mirror ETag state: images this worker already has
    in that version are kept, missing or changed ones are downloaded, files the inventory does
    not list are removed. No LIST request is made. Returns the sync's result: ``files`` maps each
    key to its path on this worker; pass it to :func:`~inspection_refresh.storage.require_complete`.
    """
    try:
        objects = [ObjectInfo(key=item["key"], size=int(item["size"]), etag=str(item["etag"])) for item in inventory]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"an inventory entry lacks key, etag or size ({exc!r}); the run's download must record "
                         "all three for each image") from exc
    _, refused = plan_mirror(objects, prefix, Path(mirror_dir))
    if refused:  # before the sync touches the mirror
        raise UnsafeKeyError(f"{counted(len(refused), 'inventory key')} cannot be mirrored under {prefix!r}: "
                             f"{refused[0][1]}")
    return storage.sync_prefix(prefix, mirror_dir, objects=objects)
