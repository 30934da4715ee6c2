""":class:`RunStore`: one run's files, and the one interface its tasks hand work to each other through."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from inspection_refresh.config import Settings
from inspection_refresh.files import tree_files, tree_paths
from inspection_refresh.progress import counted
from inspection_refresh.runstore.backends import LocalRuns, Runs, StorageRuns
from inspection_refresh.runstore.names import (
    BACKENDS, DIR_MANIFEST, RunFileMissing, RunStoreError, UnsafeNameError, check_component, check_name,
    run_work_dir, safe_run_id, storage_prefix,
)
from inspection_refresh.storage import ObjectStorage, is_safe_relative_key, local_path_for_key

log = logging.getLogger(__package__)  # one logger for the run store, as before it was a package

T = TypeVar("T")


class RunStore:
    """The files one run's tasks hand each other; build one with :meth:`for_run` (or :meth:`at`).

    :param runs: the backend (all runs of one pipeline).
    :param run: this run's folder in it (a safe run id).
    :param retention_days: :meth:`sweep`'s default age (``INSPECTION_RUN_RETENTION_DAYS``).
    :param folder: ``""``, or the folder (ending in ``/``) of the run that names are relative to (:meth:`within`).
    """

    def __init__(self, runs: Runs, run: str, *, retention_days: float = 14.0, folder: str = "") -> None:
        self._runs = runs
        self.run = run
        self.retention_days = retention_days
        self.folder = folder

    # -- construction ---------------------------------------------------------------
    @classmethod
    def for_run(
        cls, pipeline: str, run_id: str, settings: Settings, *, storage: ObjectStorage | None = None,
    ) -> RunStore:
        """The store of ``run_id`` (any Airflow run id, or a key such as ``normal-<run id>``) of ``pipeline``.

        The backend is ``settings.run_store``, chosen here once for the run: ``local`` keeps today's work
        directory (:func:`run_work_dir`), ``storage`` uses ``storage`` under ``settings.run_store_prefix``
        (:func:`inspection_refresh.compose.run_store` passes the settings' connection and bucket).
        """
        check_component("pipeline", pipeline)
        run = check_component("run", safe_run_id(run_id))
        if settings.run_store == "local":
            work_dir = run_work_dir(settings.cache_root, pipeline, run_id)
            return cls(LocalRuns(work_dir.parent), run, retention_days=settings.run_retention_days)
        if settings.run_store == "storage":
            if storage is None:
                raise RunStoreError("INSPECTION_RUN_STORE is 'storage': the run store needs its object storage")
            runs = StorageRuns(storage, f"{storage_prefix(settings.run_store_prefix)}{pipeline}/")
            return cls(runs, run, retention_days=settings.run_retention_days)
        raise RunStoreError(f"INSPECTION_RUN_STORE must be one of {', '.join(BACKENDS)}, not {settings.run_store!r}")

    def within(self, folder: str) -> RunStore:
        """The same run with names relative to ``folder`` (e.g. a product's ``BRKT01``): its files are
        ``folder/<name>``. :meth:`remove_run` and :meth:`sweep` still act on whole runs."""
        return RunStore(self._runs, self.run, retention_days=self.retention_days,
                        folder=f"{self.folder}{check_name(folder)}/")

    @classmethod
    def at(cls, work_dir: str | os.PathLike, *, retention_days: float = 14.0) -> RunStore:
        """A local store over an existing directory (how :mod:`.tasks.stages` takes a plain path)."""
        work_dir = Path(work_dir)
        return cls(LocalRuns(work_dir.parent), work_dir.name, retention_days=retention_days)

    # -- where ------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``local`` or ``storage`` (for log lines: tasks use the hand-over methods, not this)."""
        return self._runs.name

    @property
    def location(self) -> str:
        """The run's (or :meth:`within` folder's) directory or ``s3://bucket/prefix/``, for log lines."""
        return self._runs.describe(self.run, self.folder)

    @property
    def local_dir(self) -> Path | None:
        """The run's (or :meth:`within` folder's) directory with the ``local`` backend, else ``None``."""
        return self._runs.local_dir(self.run, self.folder)

    def local_path(self, name: str) -> Path | None:
        """Where the run file ``name`` is on this disk with the ``local`` backend, else ``None``."""
        local_dir = self.local_dir
        return local_dir / check_name(name) if local_dir is not None else None

    def __repr__(self) -> str:
        return f"RunStore({self.backend}: {self.location})"

    # -- files ------------------------------------------------------------------------
    def _name(self, name: str) -> str:
        """The run-relative name of ``name`` (refused if it could leave the run)."""
        return self.folder + check_name(name)

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
        files = tree_paths(source, skip=skip)
        for relative, path in files.items():
            if relative == DIR_MANIFEST or not is_safe_relative_key(relative):
                raise UnsafeNameError(f"cannot store {path} in run directory {name!r}: unusable name")
        manifest = f"{name}/{DIR_MANIFEST}"
        self._runs.delete(self.run, [manifest])  # incomplete while it is rewritten
        self._each(lambda item: self._runs.put_file(self.run, f"{name}/{item[0]}", item[1]), list(files.items()))
        # Sizes for get_dir's checks; sha256s name the tree without fetching it (kept_files, approvals).
        hashed = tree_files(source, skip=skip)
        self._write_json(manifest, {"files": {relative: hashed[relative][0] for relative in files},
                                    "sha256": {relative: hashed[relative][1] for relative in files}})
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
        paths = {relative: local_path_for_key(check_name(relative), "", target) for relative in listed}

        def fetch(relative: str) -> None:
            self._runs.get_file(self.run, f"{name}/{relative}", paths[relative])
            if paths[relative].stat().st_size != listed[relative]:
                raise RunStoreError(f"run file {self._runs.describe(self.run, f'{name}/{relative}')} has "
                                    f"{paths[relative].stat().st_size} bytes, its manifest says {listed[relative]}")

        self._each(fetch, list(paths))
        return target

    def stored_files(self, name: str) -> dict[str, tuple[int, str]] | None:
        """Size and sha256 of each file of the stored directory ``name``, from its manifest (``None`` if
        the manifest predates sha256s); :class:`RunFileMissing` if no complete directory was stored."""
        try:
            manifest = self._read_json(f"{self._name(name)}/{DIR_MANIFEST}")
        except RunFileMissing:
            raise RunFileMissing(f"no complete run directory {self._runs.describe(self.run, self._name(name) + '/')}"
                                 ) from None
        if set(manifest.get("sha256", {})) != set(manifest["files"]):
            return None
        return {relative: (size, manifest["sha256"][relative]) for relative, size in manifest["files"].items()}

    def _each(self, work: Callable[[Any], None], items: list) -> None:
        """``work(item)`` for every item, several at once where the backend transfers in parallel."""
        if self._runs.transfers <= 1 or len(items) <= 1:
            for item in items:
                work(item)
            return
        with ThreadPoolExecutor(min(self._runs.transfers, len(items)), thread_name_prefix="runstore") as pool:
            for _ in pool.map(work, items):
                pass

    # -- hand-over between tasks ------------------------------------------------------------
    # Tasks call these the same way with either backend. ``local``: every task of the run works on this
    # disk, so what a task writes or keeps stays where it is and nothing is copied. ``storage``: a later
    # task may run on another worker, so what a task keeps is uploaded and fetched again where needed.
    @contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """A local path to write the run file ``name`` at (``np.save(path, ...)``): the run's own file
        (``local``), or a scratch file stored as ``name`` when the block ends without an error."""
        with self._runs.writing(self, check_name(name)) as path:
            yield path

    @contextmanager
    def reading(self, name: str) -> Iterator[Path]:
        """A local path to read the run file ``name`` from: the run's own file (``local``), or a scratch
        copy removed after the block (:class:`RunFileMissing` if none was stored)."""
        with self._runs.reading(self, check_name(name)) as path:
            yield path

    def keep_file(self, name: str, path: str | os.PathLike) -> None:
        """Keep the local file ``path`` as the run file ``name``: nothing to do where it already is that
        file (written in the ``local`` :meth:`workspace`), else it is stored (:meth:`put_file`)."""
        self._runs.keep_file(self, check_name(name), Path(path))

    def workspace(self, scratch: str | os.PathLike) -> Path:
        """A local directory for a task to write what it keeps (:meth:`keep_file`, :meth:`keep_dir`): the
        run's (or :meth:`within` folder's) own directory (``local``), or ``scratch`` on this worker, emptied
        of what an earlier try left; :meth:`release` removes it once kept."""
        return self._runs.workspace(self, Path(scratch))

    def release(self, path: str | os.PathLike, remove: Callable[[Path], None] | None = None) -> None:
        """This worker's copy of what the run now keeps is no longer needed: ``remove(path)`` (default:
        delete the tree) with ``storage``; nothing with ``local``, where it is what later tasks use."""
        self._runs.release(Path(path), remove or _remove_tree)

    def keep_dir(self, name: str, directory: str | os.PathLike, *, skip: Iterable[str] = ()) -> dict[str, str]:
        """Hand the local ``directory`` a task built to the run's later tasks as ``name``; return what
        to record in its stage record for them (:meth:`fetch_dir`, :meth:`find_dir`).

        ``local``: it stays where it is, nothing is copied; returns ``{"staging": "<directory>"}``.
        ``storage``: it is stored as ``name`` (:meth:`put_dir`, without ``skip``, entries a later task
        rebuilds on its own worker); returns ``{}``. :meth:`release` then removes this worker's copy.
        """
        return self._runs.keep_dir(self, check_name(name), Path(directory), skip)

    @contextmanager
    def fetch_dir(self, name: str, kept: dict[str, Any], make: Callable[[], Path], *,
                  refill: Callable[[Path], None] | None = None, discard: Callable[[Path], None],
                  keep_in_place: bool) -> Iterator[Path]:
        """The directory kept as ``name`` (:meth:`keep_dir`, or a ``staging`` a task recorded), on this worker.

        ``local``: where it was kept (``kept["staging"]``, from the stage record). ``storage``: a new
        directory ``make()`` filled from the store, then ``refill(directory)`` (what ``skip`` left out).
        If fetching or the block fails, ``discard(directory)`` removes a fetched copy (a retry fetches it
        anew) and, unless ``keep_in_place``, the directory kept in place too.
        """
        with self._runs.fetch_dir(self, check_name(name), kept, make, refill, discard, keep_in_place) as found:
            yield found

    def kept_files(self, name: str, kept: dict[str, Any], *, skip: Iterable[str] = ()) -> dict[str, tuple[int, str]]:
        """Size and sha256 of each file of the directory kept as ``name`` (:meth:`keep_dir`), by relative path,
        without the top-level entries ``skip``: what an approval names (:func:`~inspection_refresh.files.tree_digest`).

        ``local``: hashed where it was kept (``kept["staging"]``). ``storage``: read from the stored manifest
        (fetched and hashed only for a directory stored before manifests carried sha256s).
        """
        return self._runs.kept_files(self, check_name(name), kept, tuple(skip))

    def find_dir(self, name: str, kept: dict[str, Any], *, done: str) -> RunStore | None:
        """A store over the directory kept as ``name``, to read some of its files without fetching it all;
        ``None`` while there is none: ``local``, the ``kept["staging"]`` directory once it holds the file
        ``done``; ``storage``, the stored directory once complete."""
        found: RunStore | None = self._runs.find_dir(self, check_name(name), kept, done)
        return found

    def fetch_images(self, storage: ObjectStorage, prefix: str, images: list[dict[str, Any]],
                     mirror_dir: str | os.PathLike) -> dict[str, Path]:
        """Key -> the image on this worker, for each ``{"key", "etag", "size", "path"}`` a run's download listed.

        ``local``: the paths it recorded (every task shares the download's mirror). ``storage``: this
        worker's ``mirror_dir`` is brought to the list first (:func:`materialise_images`: only what it
        lacks or holds in another version is downloaded); an image that cannot be fetched fails the task.
        """
        return self._runs.fetch_images(storage, prefix, images, Path(mirror_dir))

    def settle_ahead(self, settle: Callable[[], T], *, otherwise: T) -> T:
        """For a task that prepares a later one (e.g. the directory its command writes into): ``settle()``
        with ``local``, where paths settled now hold for the later task; ``otherwise`` with ``storage``,
        where the later task may run on another worker and settles its own (:meth:`settle_here`)."""
        return self._runs.settle_ahead(settle, otherwise)

    def settle_here(self, settle: Callable[[], None]) -> None:
        """For that later task, on its own worker: ``settle()`` with ``storage``; nothing with ``local``,
        where the preparing task settled it ahead (:meth:`settle_ahead`)."""
        self._runs.settle_here(settle)

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


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
