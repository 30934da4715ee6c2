"""Live progress of a run's long stages for the Deployments page, kept in the run's ``deployment_logs`` row.

A stage wraps its work in ``reporting_progress(stage_reporter(...))``: each line its
:class:`~inspection_refresh.progress.Progress` logs (every few seconds, and the closing one) is also
written to ``result_data.progress[<stage>]`` of the run's open row (only while it is ``running``), so
the console, on the API server, shows the same figures as the log without reading any worker's files.
Stage keys are the task's name, with the product code for PatchCore's per-product tasks
(``download``, ``embed``, ``prepare BRKT01``, ``build BRKT01``).

The PatchCore build script gets no database credentials, so it writes its reports to a JSON file
(:func:`~inspection_refresh.progress.progress_file_writer`) and the build task's own process relays
that file to the row (:class:`ProgressFileRelay`, started in ``pre_execute``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from inspection_refresh.progress import ProgressReport, ProgressReporter, read_progress_file

log = logging.getLogger(__name__)

MIN_REPORT_SECONDS = 2.0
"""At most one row update per stage in this many seconds (the closing report always goes)."""
RELAY_POLL_SECONDS = 2.0


def progress_figures(report: ProgressReport) -> dict[str, Any]:
    """What the row keeps of one report: the log line's figures and when they were taken."""
    return {**report.as_dict(), "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def stage_reporter(registry_source: Callable[[], Any], dag_id: str, run_id: str, stage: str, *,
                   min_interval: float = MIN_REPORT_SECONDS,
                   clock: Callable[[], float] = time.monotonic) -> ProgressReporter:
    """A reporter writing ``stage``'s figures into the run's open row (``registry.report_progress``).

    ``registry_source`` opens the registry on first use. A database error is logged once as a warning
    and never raised: the figures are for people watching, the stage itself must go on.
    """
    state: dict[str, Any] = {"registry": None, "last": None, "warned": False}

    def report(progress: ProgressReport) -> None:
        now = clock()
        if not progress.finished and state["last"] is not None and now - state["last"] < min_interval:
            return
        state["last"] = now
        try:
            if state["registry"] is None:
                state["registry"] = registry_source()
            state["registry"].report_progress(dag_id, run_id, stage, progress_figures(progress))
        except Exception as exc:
            if not state["warned"]:
                state["warned"] = True
                log.warning("Could not show the progress of %s on the Deployments page (%s: %s); the log has it",
                            stage, type(exc).__name__, exc)

    return report


def run_reporter(run: Any, stage: str) -> ProgressReporter:
    """:func:`stage_reporter` for a pipeline's run object (its ``settings.db_conn_id``, ``dag_id``, ``run_id``)."""
    from inspection_refresh import compose

    return stage_reporter(lambda: compose.deployment_registry(run.settings.db_conn_id), run.dag_id, run.run_id, stage)


class ProgressFileRelay:
    """A daemon thread that passes the reports a process leaves in ``path`` on to ``reporter``.

    Polls every ``interval`` seconds and relays a report only when it changed. :meth:`stop` relays
    the last report (the closing line) and ends the thread; it is safe to call twice.
    """

    def __init__(self, path: Path, reporter: ProgressReporter, interval: float = RELAY_POLL_SECONDS) -> None:
        self.path = Path(path)
        self.reporter = reporter
        self.interval = interval
        self._stopped = threading.Event()
        self._last: ProgressReport | None = None
        self._thread = threading.Thread(target=self._run, name=f"progress-relay-{self.path.parent.name}",
                                        daemon=True)

    def start(self) -> ProgressFileRelay:
        self.path.unlink(missing_ok=True)  # a retry's file must not show the failed try's figures
        self._thread.start()
        return self

    def _relay_once(self) -> None:
        report = read_progress_file(self.path)
        if report is not None and report != self._last:
            self._last = report
            try:
                self.reporter(report)
            except Exception as exc:  # the reporter logs its own errors; a bug must not kill the thread
                log.warning("Progress relay of %s: %s: %s", self.path, type(exc).__name__, exc)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self._relay_once()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)
        self._relay_once()
