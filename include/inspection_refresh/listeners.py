"""Airflow listener: a run an operator marks failed (or success) closes its ``deployment_logs`` row.

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
    from inspection_refresh.airflow_support import close_open_deployment

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
