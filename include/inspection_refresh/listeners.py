"""Airflow listeners: a run an operator marks failed (or success) closes its ``deployment_logs`` row;
a run whose tasks need a pool that does not exist fails as it starts (see the last hook).

Airflow calls a DAG's ``on_failure_callback`` only for runs the scheduler fails (a task failed,
``dagrun_timeout``, deadlock). A run marked failed or success in the UI or through the REST API
(``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}``) gets no callback: Airflow stops its running
tasks and never runs the rest, so ``register`` cannot close the row. Airflow does call the
listeners' ``on_dag_run_failed`` / ``on_dag_run_success`` then, in the API server process that
handled the request; ``plugins/deployment_records.py`` registers this module there.

Imports Airflow core (``airflow.listeners``), so only the plugin imports it, never a DAG file.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)

DEPLOYMENT_TAG = "deployment"
"""The tag of this package's DAGs, each of whose runs owns one ``deployment_logs`` row."""

SCHEDULER_MESSAGES = frozenset({"success", "task_failure", "timed_out", "all_tasks_deadlocked"})
"""What the scheduler passes when it ends a run itself: ``register`` or the DAG's failure callback
(which names the failed task) closes those rows, so the listener leaves them, and the scheduler
loop never waits on the service's database."""


def close_deployment_of_run_set_by_operator(dag_run: Any, state: str, msg: str) -> bool:
    """Close ``dag_run``'s deployment row as failed if an operator ended the run; True if it closed one."""
    if msg in SCHEDULER_MESSAGES:
        return False
    dag = getattr(dag_run, "dag", None)
    if dag is None or DEPLOYMENT_TAG not in (getattr(dag, "tags", None) or ()):
        return False  # another team's DAG: no deployment row, and no query for it
    from inspection_refresh.runtime import close_open_deployment

    return close_open_deployment(
        dag_run.dag_id, dag_run.run_id,
        f"was marked {state} through the Airflow UI or API while it ran ({msg!r}), so it could not record "
        "its outcome: Airflow stopped its running tasks and did not run the rest",
    )


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    close_deployment_of_run_set_by_operator(dag_run, "failed", msg)


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    close_deployment_of_run_set_by_operator(dag_run, "success", msg)


@hookimpl
def on_dag_run_running(dag_run: Any, msg: str) -> None:
    fail_run_needing_missing_pools(dag_run, msg)


def pool_create_command(pool: str) -> str:
    """The ``airflow pools set`` command for one of this package's pools, with the size it needs."""
    from inspection_refresh.config import get_settings

    settings = get_settings()
    sizes = {settings.transfer_pool: (settings.max_transfers, "Object-storage downloads"),
             settings.patchcore_pool: (1, "Concurrent PatchCore bank builds")}
    slots, description = sizes.get(pool, (1, pool))
    return f'airflow pools set {pool} {slots} "{description}"'


def fail_run_needing_missing_pools(dag_run: Any, msg: str) -> list[str]:
    """Fail a starting run of this package's DAGs at once if a pool its tasks use does not exist.

    Airflow never starts a task whose pool is missing: the run would wait until its
    ``dagrun_timeout`` (hours) with every task "scheduled" and no error anywhere a task log shows.
    Runs in the scheduler, which calls this hook while it moves the run to running, in its own
    session: the run is set to failed there, with a note (shown on the run's page in the UI) that
    gives the command to create each missing pool. Returns the missing pools.
    """
    dag = getattr(dag_run, "dag", None)
    if msg != "started" or dag is None or DEPLOYMENT_TAG not in (getattr(dag, "tags", None) or ()):
        return []
    from airflow.models.pool import Pool
    from airflow.utils import timezone
    from airflow.utils.state import DagRunState
    from sqlalchemy import select
    from sqlalchemy.orm import object_session

    session = object_session(dag_run)
    if session is None:
        return []
    needed = {task.pool for task in dag.tasks if getattr(task, "pool", None)}
    missing = sorted(needed - set(session.scalars(select(Pool.pool).where(Pool.pool.in_(needed)))))
    if not missing:
        return []
    reason = (f"Not started: its tasks use pool(s) {', '.join(missing)}, which do not exist, so Airflow would never "
              f"run them. Create them, then trigger again: {'; '.join(pool_create_command(p) for p in missing)}")
    log.error("%s run %s: %s", dag_run.dag_id, dag_run.run_id, reason)
    dag_run.state = DagRunState.FAILED
    dag_run.end_date = timezone.utcnow()
    dag_run.note = reason
    return missing
