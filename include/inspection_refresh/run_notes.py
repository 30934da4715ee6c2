"""The note on a deployment run's page: one line saying what the run did ("3 products unchanged,
nothing published", "unknown product code XYZ ...").

A task cannot set its run's note: the Task SDK has no call for it (its execution API only reads
the run). So a task leaves the line as an XCom (:func:`inspection_refresh.runtime.leave_run_note`), and this listener, which Airflow calls in the scheduler when the run ends (and in
``dag.test()``), copies the latest such line onto the run, unless a person or another listener
already wrote a note. ``plugins/deployment_schedule.py`` registers it.

Imports Airflow core (``airflow.listeners``), so only the plugin imports it, never a DAG file.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)

DEPLOYMENT_TAG = "deployment"


def note_left_by_tasks(dag_run: Any, session: Any) -> str | None:
    """The latest note a task of ``dag_run`` left (XCom ``RUN_NOTE_KEY``), or ``None``."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    from inspection_refresh.runtime import RUN_NOTE_KEY

    row = session.scalars(select(XComModel).where(
        XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id, XComModel.key == RUN_NOTE_KEY,
    ).order_by(XComModel.timestamp.desc()).limit(1)).first()
    value = XComModel.deserialize_value(row) if row is not None else None
    return str(value) if value else None


def set_note_from_tasks(dag_run: Any) -> str | None:
    """Set ``dag_run``'s note to what its tasks left, if it has none; the note set, or ``None``.

    In the scheduler the run belongs to the scheduler's session, which writes the note with the run's new
    state; a run passed detached (``dag.test()``) is read and written in a session of its own.
    """
    dag = getattr(dag_run, "dag", None)
    if dag is None or DEPLOYMENT_TAG not in (getattr(dag, "tags", None) or ()):
        return None
    from sqlalchemy.orm import object_session

    try:
        session = object_session(dag_run)
        if session is not None:
            return _set_note(dag_run, session)
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session

        with create_session() as own:
            bound = own.query(DagRun).filter(DagRun.dag_id == dag_run.dag_id, DagRun.run_id == dag_run.run_id).one()
            return _set_note(bound, own)
    except Exception as exc:  # a note is a convenience: never fail the scheduler loop for it
        log.warning("Could not set the run note of %s run %s: %s", dag_run.dag_id, dag_run.run_id, exc)
        return None


def _set_note(dag_run: Any, session: Any) -> str | None:
    if dag_run.note:  # a person's note, or another listener's (e.g. a missing pool) stays
        return None
    note = note_left_by_tasks(dag_run, session)
    if note:
        dag_run.note = note
    return note


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    set_note_from_tasks(dag_run)


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    set_note_from_tasks(dag_run)
