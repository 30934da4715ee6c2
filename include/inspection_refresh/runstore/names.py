"""What a run store may be asked for: its errors, and the checks that keep every name inside its run."""

from __future__ import annotations

import re
from pathlib import Path

from inspection_refresh.storage import is_safe_relative_key

BACKENDS = ("local", "storage")
DIR_MANIFEST = ".runstore-manifest.json"
"""Written last into a stored directory: names and sizes of its files. Without it the directory is absent."""
KEPT_AT = "staging"
"""The fact a local store's :meth:`~inspection_refresh.runstore.RunStore.keep_dir` answers with: where the
directory stays (both pipelines record it in their stage records under this name)."""


class RunStoreError(RuntimeError):
    """A run store was misconfigured or asked for something it cannot do."""


class UnsafeNameError(RunStoreError, ValueError):
    """A name would leave the run (``..``, absolute, empty or ``.`` segments, backslashes, NUL)."""


class RunFileMissing(RunStoreError, FileNotFoundError):
    """The run has no such file (or no complete directory of that name)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not is_safe_relative_key(name):
        raise UnsafeNameError(f"refusing run file name {name!r}: use a relative path without '..', '.', "
                              "empty or absolute segments (e.g. 'vectors.npy', 'BRKT01/stage-build.json')")
    return name


def check_component(what: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", value or "") or value in (".", ".."):
        raise UnsafeNameError(f"{what} {value!r} cannot name a run store folder (letters, digits, '.', '_', '-')")
    return value


def storage_prefix(prefix: str) -> str:
    """``airflow-runs`` -> ``airflow-runs/``; empty stays empty (the bucket's top level)."""
    prefix = prefix.strip().strip("/")
    if prefix and not is_safe_relative_key(prefix):
        raise UnsafeNameError(f"INSPECTION_RUN_STORE_PREFIX {prefix!r} is not a usable key prefix")
    return f"{prefix}/" if prefix else ""


def safe_run_id(run_id: str) -> str:
    """Airflow run ids contain ``:`` and ``+``; make one usable as a directory name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:120]


def run_work_dir(cache_root: Path, pipeline: str, run_id: str) -> Path:
    """A per-run scratch directory for files passed between tasks (XCom carries only their paths)."""
    path = Path(cache_root) / pipeline / "runs" / safe_run_id(run_id)
    path.mkdir(parents=True, exist_ok=True)
    return path
