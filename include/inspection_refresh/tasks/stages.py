"""Per-run stage records: what each task did, kept next to the run's work files.

Every task of a deployment records its outcome (``ok``, ``failed`` with the
error, or ``skipped``) as ``stage-<name>.json`` in the run's work directory or,
given a :class:`~inspection_refresh.runstore.RunStore`, in that store (so the
record is readable from another worker). The closing
``register`` task reads them to write one honest ``deployment_logs`` row, even
when a task failed, was retried or never ran, without needing the metadata DB.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inspection_refresh.runstore import RunFileMissing, RunStore
from inspection_refresh.runtime import PermanentError
from inspection_refresh.tasks.common import NothingToDo


def as_run_store(work_dir: Path | RunStore) -> RunStore:
    """A :class:`RunStore` as it is; a work directory as the local store over it."""
    return work_dir if isinstance(work_dir, RunStore) else RunStore.at(work_dir)


class StageRecorder:
    """Records one stage's outcome; ``facts`` set inside the block are saved with it."""

    def __init__(self, work_dir: Path | RunStore, stage: str) -> None:
        self.store = as_run_store(work_dir)
        self.name = f"stage-{stage}.json"
        self.path = self.store.local_path(self.name)
        """The record's file with a local store (``None`` in object storage)."""
        self.stage = stage
        self.facts: dict[str, Any] = {}

    def save(self, status: str, message: str = "", seconds: float = 0.0) -> None:
        self.store.write_json(self.name, {"stage": self.stage, "status": status, "message": message,
                                          "seconds": round(seconds, 3), "facts": self.facts})


def failure_message(exc: BaseException) -> str:
    """A failed stage's message: what a :class:`PermanentError` (bad input, the operator must act) says, for
    people; ``"<class>: <text>"`` for any other error, whose class tells what broke."""
    return str(exc) if isinstance(exc, PermanentError) else f"{type(exc).__name__}: {exc}"


@contextmanager
def record_stage(work_dir: Path | RunStore, stage: str) -> Iterator[StageRecorder]:
    """Run a stage, saving ``ok``/``failed``/``skipped`` and the error message, then re-raise."""
    recorder = StageRecorder(work_dir, stage)
    started = time.monotonic()
    try:
        yield recorder
    except NothingToDo as exc:
        recorder.save("skipped", str(exc), time.monotonic() - started)
        raise
    except BaseException as exc:
        recorder.save("failed", failure_message(exc), time.monotonic() - started)
        raise
    recorder.save("ok", "", time.monotonic() - started)


def read_stages(work_dir: Path | RunStore, stages: list[str]) -> dict[str, dict[str, Any]]:
    """Stage records by name (from a work directory or a run store); a stage that left no record is ``not run``."""
    store = as_run_store(work_dir)
    records = {}
    for stage in stages:
        try:
            records[stage] = store.read_json(f"stage-{stage}.json")
        except RunFileMissing:
            records[stage] = {"stage": stage, "status": "not run",
                              "message": "the task did not run or did not finish", "facts": {}}
    return records


def first_failure(records: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    """(stage, message) of the first stage that did not succeed, in pipeline order."""
    for stage, record in records.items():
        if record["status"] != "ok":
            return stage, record["message"]
    return None
