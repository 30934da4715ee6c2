"""Pieces every DAG's task functions share: run work directories, small JSON files, recorded outcomes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from inspection_refresh.files import write_json_atomic
from inspection_refresh.publish import LostToRollback, Publisher, Superseded
from inspection_refresh.registry import DeploymentRegistry
from inspection_refresh.runstore import safe_run_id

log = logging.getLogger(__name__)


class NothingToDo(Exception):
    """The run has nothing to deploy (e.g. a scheduled run with unchanged images); the DAG skips."""


def recorded_outcome(registry: DeploymentRegistry, dag_id: str, run_id: str) -> dict[str, Any] | None:
    """What the run's already closed deployment row says, for a register task cleared after its
    run removed the work files (a completed run): the row must stay as recorded, not turn failed."""
    recorded = registry.closed_outcome(dag_id, run_id)
    if recorded:
        log.info("%s run %s already recorded deployment #%s as %s and its work files are gone: "
                 "leaving the record as it is", dag_id, run_id, recorded["deploy_id"], recorded["status"])
    return recorded


def live_version(publisher: Publisher, name: str) -> str | None:
    """What is live of ``name`` for a deployment row: the channel's ``current.json`` (this host's live link
    if the channel cannot be read now: a row is written all the same)."""
    try:
        return publisher.live_version(name)
    except Exception as exc:
        log.warning("Cannot read the live version of %s from the release channel (%s); using this host's", name, exc)
        return publisher.current(name)


def lost_race(message: str) -> str | None:
    """The reason of a publish stage that failed because another change of what is live won (a rollback
    while the run uploaded, a newer version from another host), without the error's class name; ``None``
    for any other failure. ``message`` is the stage record's ``"<class>: <text>"``."""
    kind, _, reason = message.partition(": ")
    return reason if kind in (LostToRollback.__name__, Superseded.__name__) else None


def prune_run_work_dirs(cache_root: Path, pipeline: str, older_than_days: float = 14) -> list[Path]:
    """Remove work directories that failed runs left behind more than ``older_than_days`` ago."""
    cutoff = time.time() - older_than_days * 86400
    removed = []
    for path in (Path(cache_root) / pipeline / "runs").glob("*"):
        if path.is_dir() and path.stat().st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_run_work_dir(cache_root: Path, pipeline: str, run_id: str) -> None:
    shutil.rmtree(Path(cache_root) / pipeline / "runs" / safe_run_id(run_id), ignore_errors=True)


def write_json(path: Path, data: Any) -> Path:
    """Write a run's work file atomically (scratch data: no fsync)."""
    return write_json_atomic(path, data, indent=1, fsync=False)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def cap_list(items: list, limit: int = 50) -> list:
    """Keep XCom and result_data small: the first ``limit`` items and a count of the rest."""
    return items if len(items) <= limit else [*items[:limit], f"... and {len(items) - limit} more"]


ROLLBACK_DAG_ID = "deployment_rollback"


def unpin_hint(artefact: str) -> str:
    """How an operator lets scheduled runs deploy a pinned ``artefact`` (``clip:normal``, a product code) again."""
    return (f"To deploy it again, trigger a manual run (publishing a new version removes the pin), or unpin it: "
            f"trigger {ROLLBACK_DAG_ID} with artefact={artefact} and unpin=true, or run 'inspection-publish unpin'.")
