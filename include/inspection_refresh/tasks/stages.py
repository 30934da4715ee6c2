"""Per-run stage records: what each task did, kept next to the run's work files.

Every task of a deployment records its outcome (``ok``, ``failed`` with the
error, or ``skipped``) in ``<work_dir>/stage-<name>.json``. The closing
``register`` task reads them to write one honest ``deployment_logs`` row, even
when a task failed, was retried or never ran, without needing the metadata DB.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inspection_refresh.tasks.common import NothingToDo, read_json, write_json


class StageRecorder:
    """Records one stage's outcome; ``facts`` set inside the block are saved with it."""

    def __init__(self, work_dir: Path, stage: str) -> None:
        self.path = Path(work_dir) / f"stage-{stage}.json"
        self.stage = stage
        self.facts: dict[str, Any] = {}

    def save(self, status: str, message: str = "", seconds: float = 0.0) -> None:
        write_json(self.path, {"stage": self.stage, "status": status, "message": message,
                               "seconds": round(seconds, 3), "facts": self.facts})


@contextmanager
def record_stage(work_dir: Path, stage: str) -> Iterator[StageRecorder]:
    """Run a stage, saving ``ok``/``failed``/``skipped`` and the error message, then re-raise."""
    recorder = StageRecorder(work_dir, stage)
    started = time.monotonic()
    try:
        yield recorder
    except NothingToDo as exc:
        recorder.save("skipped", str(exc), time.monotonic() - started)
        raise
    except BaseException as exc:
        recorder.save("failed", f"{type(exc).__name__}: {exc}", time.monotonic() - started)
        raise
    recorder.save("ok", "", time.monotonic() - started)


def read_stages(work_dir: Path, stages: list[str]) -> dict[str, dict[str, Any]]:
    """Stage records by name; a stage that left no record is reported as ``not run``."""
    records = {}
    for stage in stages:
        path = Path(work_dir) / f"stage-{stage}.json"
        records[stage] = read_json(path) if path.exists() else {
            "stage": stage, "status": "not run", "message": "the task did not run or did not finish", "facts": {}}
    return records


def first_failure(records: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    """(stage, message) of the first stage that did not succeed, in pipeline order."""
    for stage, record in records.items():
        if record["status"] != "ok":
            return stage, record["message"]
    return None
