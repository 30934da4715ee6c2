"""Runs in progress on the Deployments page: each running run's stage, and its figures while long stages work.

Which runs are in progress, and which of their tasks are at work or waiting, is Airflow's answer
(its REST API, asked with the viewer's own token: Airflow shows only what this user may read);
the figures are what the run's tasks wrote into its ``deployment_logs`` row
(``result_data.progress``, see :mod:`inspection_refresh.tasks.live_progress`): the same as their
progress log lines, readable on the API server whichever worker does the work.

Stage keys match the tasks' own: the task's name (``download``, ``embed``), with the product code
for PatchCore's mapped tasks (``prepare BRKT01``, ``build BRKT01``, the UI's map index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import httpx

from inspection_refresh.console.airflow_api import _error_detail
from inspection_refresh.registry import DeploymentRegistry, RegistryError

ACTIVE_RUN_STATES = ("queued", "running")
ACTIVE_TASK_STATES = ("running", "awaiting_input", "deferred", "queued", "up_for_retry", "up_for_reschedule")
"""Task states shown as the run's current stage (scheduled tasks have not started: left out)."""
APPROVAL_TASK_ID = "approve"
WAITING_FOR_APPROVAL = "waiting for approval"
TIMEOUT_SECONDS = 10.0
REFRESH_SECONDS = 5
"""How often the page's script fetches the section again."""
TASK_STATE_WORDS = {"queued": "queued", "up_for_retry": "waiting to retry", "up_for_reschedule": "waiting",
                    "deferred": "deferred"}


@dataclass(frozen=True)
class Stage:
    """One stage of a run: a task at work (or waiting), or figures a finished stage left in the row."""

    key: str
    """``embed``, ``build BRKT01``: the progress key in the row."""
    title: str
    """What the page says: the stage, ``waiting for approval``, or ``build BRKT01 (queued)``."""
    state: str
    """The task's Airflow state; ``finished`` for a stage known only from its figures."""
    figures: dict[str, Any] | None = None
    """The stage's last progress report (:class:`~inspection_refresh.progress.ProgressReport` fields and
    ``updated_at``), if it wrote any."""
    approval_url: str | None = None
    """The ``approve`` task's Required Actions page in the Airflow UI, while it waits."""


@dataclass(frozen=True)
class RunInProgress:
    dag_id: str
    run_id: str
    state: str
    url: str
    """The run's page in the Airflow UI."""
    started: str | None
    stages: list[Stage] = field(default_factory=list)
    """At work or waiting first (Airflow's answer), then the finished stages' figures."""
    deploy_id: int | None = None


@dataclass(frozen=True)
class RunsInProgress:
    runs: list[RunInProgress]
    problem: str | None = None
    """Why the list may be incomplete (Airflow's API or the database unreachable), in words."""
    checked_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def as_json(self) -> dict[str, Any]:
        return {"runs": [asdict(run) for run in self.runs], "problem": self.problem, "checked_at": self.checked_at}


class AirflowRuns:
    """Airflow's REST API as the viewer: the active runs of some DAGs and their active tasks."""

    def __init__(self, api_url: str, token: str, timeout: float = TIMEOUT_SECONDS) -> None:
        self.api_url = api_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.timeout = timeout

    def _call(self, client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
        response = client.request(method, f"{self.api_url}{path}", headers=self.headers, **kwargs)
        if not response.is_success:
            raise RuntimeError(f"Airflow's REST API refused {method} {path} ({response.status_code}): "
                               f"{_error_detail(response)}")
        return response.json()

    def active(self, dag_ids: list[str]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """(run, its task instances in :data:`ACTIVE_TASK_STATES`) of each queued or running run, newest first."""
        with httpx.Client(timeout=self.timeout) as client:
            # POST .../list takes several DAG ids at once; like the GETs used below it leaves no audit-log entry.
            runs = self._call(client, "POST", "/api/v2/dags/~/dagRuns/list", json={
                "dag_ids": dag_ids, "states": list(ACTIVE_RUN_STATES), "order_by": "-run_after",
                "page_limit": 50})["dag_runs"]
            found = []
            for run in runs:
                path = (f"/api/v2/dags/{quote(run['dag_id'], safe='')}/dagRuns/{quote(run['dag_run_id'], safe='')}"
                        "/taskInstances")
                tasks = self._call(client, "GET", path, params={"state": list(ACTIVE_TASK_STATES), "limit": 100})
                found.append((run, tasks["task_instances"]))
        return found


def stage_key(task: dict[str, Any]) -> str:
    """``product.build`` mapped for BRKT01 -> ``build BRKT01``; ``embed`` -> ``embed``."""
    name = str(task["task_id"]).rsplit(".", 1)[-1]
    mapped = task.get("map_index") is not None and int(task.get("map_index", -1)) >= 0
    item = (task.get("rendered_map_index") or str(task.get("map_index"))) if mapped else ""
    return f"{name} {item}" if item else name


def _task_stage(task: dict[str, Any], figures: dict[str, Any] | None, approval_url: str) -> Stage:
    key, state = stage_key(task), str(task.get("state"))
    if str(task["task_id"]) == APPROVAL_TASK_ID and state in ("awaiting_input", "deferred"):
        return Stage(key, WAITING_FOR_APPROVAL, state, approval_url=approval_url)
    words = TASK_STATE_WORDS.get(state)
    return Stage(key, f"{key} ({words})" if words else key, state, figures)


def _at_work_first(task: dict[str, Any]) -> tuple[int, str, str]:
    """Running tasks first, then waiting ones, then queued (the order of :data:`ACTIVE_TASK_STATES`)."""
    state = str(task.get("state"))
    rank = ACTIVE_TASK_STATES.index(state) if state in ACTIVE_TASK_STATES else len(ACTIVE_TASK_STATES)
    return rank, str(task.get("start_date") or ""), stage_key(task)


def _earlier_stage(key: str, figures: dict[str, Any]) -> Stage:
    """A stage no task is at now, from the figures it left: finished, or stopped before the end (failed,
    or waiting for a retry)."""
    if figures.get("finished"):
        return Stage(key, key, "finished", figures)
    return Stage(key, f"{key} (stopped)", "stopped", figures)


def runs_in_progress(airflow: AirflowRuns, registry: DeploymentRegistry | None, dag_ids: list[str],
                     run_url: Callable[[str, str], str], approval_url: Callable[[str, str], str]) -> RunsInProgress:
    """The viewer's runs in progress among ``dag_ids``, with their stages and figures.

    ``run_url(dag_id, run_id)`` gives a run's Airflow UI page, ``approval_url(dag_id, run_id)`` its
    ``approve`` task's Required Actions page. Never raises: a problem is said instead.
    """
    if not dag_ids:
        return RunsInProgress([])
    try:
        active = airflow.active(dag_ids)
    except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
        return RunsInProgress([], f"cannot list the runs in progress: {type(exc).__name__}: {exc}")
    problem = None
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    if active and registry is not None:
        try:
            rows = registry.running_rows(sorted({run["dag_id"] for run, _ in active}))
        except RegistryError as exc:
            problem = f"progress figures unavailable: {exc}"
    runs = []
    for run, tasks in active:
        dag_id, run_id = str(run["dag_id"]), str(run["dag_run_id"])
        row = rows.get((dag_id, run_id)) or {}
        progress = (row.get("result_data") or {}).get("progress") or {}
        stages = [_task_stage(task, progress.get(stage_key(task)), approval_url(dag_id, run_id))
                  for task in sorted(tasks, key=_at_work_first)]
        shown = {stage.key for stage in stages}
        stages += [_earlier_stage(key, figures) for key, figures in progress.items()
                   if key not in shown and isinstance(figures, dict)]
        runs.append(RunInProgress(dag_id, run_id, str(run.get("state")), run_url(dag_id, run_id),
                                  run.get("start_date"), stages, row.get("deploy_id")))
    return RunsInProgress(runs, problem)
