"""What tasks ask of Airflow at run time: which errors a retry cannot fix, who started the run,
whether it has ended, and closing a run's deployment record when it fails.

Imported at DAG parse time (through the DAG files' callbacks), so it stays light (no torch,
open_clip or faiss).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from inspection_refresh import compose
from inspection_refresh.publish import PublishError
from inspection_refresh.registry import RegistryError
from inspection_refresh.storage import StorageError

log = logging.getLogger(__name__)


class PermanentError(RuntimeError):
    """Bad input or configuration: retrying will not help, the operator must act."""


def is_permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: wrong bucket/credentials/prefix, unreadable data, bad params."""
    if isinstance(exc, StorageError):
        return not getattr(exc, "transient", False)
    return isinstance(exc, (PermanentError, PublishError, ValueError, FileNotFoundError, PermissionError))


@contextmanager
def fail_permanent_errors() -> Iterator[None]:
    """Turn permanent errors into ``AirflowFailException`` so Airflow does not retry them. A
    :class:`PermanentError` (bad input: its message says what to do) fails with that line alone."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, PermanentError):
            log.error("%s (not retried: fix the input or configuration)", exc)
            raise _fail_exception()(f"{exc} (not retried: fix the input or configuration)") from None
        if is_permanent(exc):
            raise _fail_exception()(f"{exc} (not retried: fix the input or configuration)") from exc
        raise


RUN_NOTE_KEY = "run_note"
"""The XCom key of the line a task leaves for its run's note (``inspection_refresh.run_notes`` sets it)."""
RUN_NOTE_MAX = 1000
"""Airflow keeps at most this many characters of a run's note."""


def leave_run_note(context: Any, text: str) -> str:
    """Leave ``text`` (shortened to :data:`RUN_NOTE_MAX`) as the note of this task's run, shown on the run's
    page once it ends: the Task SDK cannot set a note, so it goes as XCom :data:`RUN_NOTE_KEY`, which the
    plugin's listener copies onto the run. Logged too. Never raises: a note is not worth failing a task."""
    note = text if len(text) <= RUN_NOTE_MAX else text[:RUN_NOTE_MAX - 1] + "…"
    log.info("Run note: %s", note)
    try:
        context["ti"].xcom_push(key=RUN_NOTE_KEY, value=note)
    except Exception as exc:
        log.warning("Could not leave the run note (%s: %s)", type(exc).__name__, exc)
    return note


def fail_unless_completed(outcome: dict[str, Any]) -> dict[str, Any]:
    """A ``register`` task's outcome; a deployment that did not complete fails the task with its message."""
    if outcome["status"] != "completed":
        raise _fail_exception()(outcome["message"])
    return outcome


def _fail_exception() -> type[Exception]:
    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:  # older Task SDKs
        from airflow.exceptions import AirflowFailException
    return AirflowFailException


def run_identity(context: Any) -> tuple[str, bool, str]:
    """(run id, whether the scheduler started it, who deployed it) from a task context."""
    dag_run = context["dag_run"]
    run_type = str(getattr(dag_run, "run_type", "") or "")
    scheduled = run_type.lower().endswith("scheduled")
    user = getattr(dag_run, "triggering_user_name", None)
    deployed_by = "airflow-scheduler" if scheduled else f"airflow:{user}" if user else "airflow"
    return context["run_id"], scheduled, deployed_by[:50]


def finished_run_state(dag_id: str, run_id: str) -> str | None:
    """Airflow's final state of a DAG run (``success`` or ``failed``), asked through the Task SDK.

    None while the run is queued or running, when Airflow does not know it (deleted, or
    written by another Airflow sharing the database) and outside a task (nobody to ask):
    the caller then leaves that run's deployment record alone rather than guess.
    """
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    try:
        state = RuntimeTaskInstance.get_dagrun_state(dag_id=dag_id, run_id=run_id)
    except Exception as exc:  # not found, no supervisor (outside a task), API unreachable
        log.warning("Cannot tell whether %s run %s has ended (%s: %s); leaving its deployment record open",
                    dag_id, run_id, type(exc).__name__, exc)
        return None
    state = str(getattr(state, "value", state))
    return state if state in ("success", "failed") else None


def refuse_publishing_if_run_ended(dag_id: str, run_id: str, what: str) -> None:
    """Raise :class:`PublishError` if this task's run has already ended: an operator marked it
    failed or success in the UI or REST API while the task ran.

    Airflow stops such a task only at its next heartbeat (``[workers] min_heartbeat_interval``,
    5 s), and a Python task ignores the SIGTERM until the SIGKILL 5 s later, so without this a task
    could publish ``what`` after its run's deployment record was closed as failed. Ask right
    before the atomic publish. Outside a running task, or if Airflow cannot be asked, it does nothing.
    """
    from airflow.sdk.execution_time import task_runner

    if getattr(task_runner, "SUPERVISOR_COMMS", None) is None:
        return  # library, CLI or test use: no Airflow run to end
    try:
        state = task_runner.RuntimeTaskInstance.get_dagrun_state(dag_id=dag_id, run_id=run_id)
    except Exception as exc:
        log.warning("Cannot ask Airflow whether %s run %s is still running (%s: %s); publishing %s",
                    dag_id, run_id, type(exc).__name__, exc, what)
        return
    state = str(getattr(state, "value", state))
    if state in ("success", "failed"):
        raise PublishError(f"Airflow run {run_id} was marked {state} while it ran: {what} is not published, "
                           "the live version stays")


def close_open_deployment(dag_id: str, run_id: str, what_happened: str) -> bool:
    """Close a run's ``deployment_logs`` row as failed if it is still open; True if it was.

    ``what_happened`` completes the sentence "Airflow run <run_id> ...". Never raises: with the
    database down the error is logged and the DAG's next run closes the row.
    """
    message = (f"Airflow run {run_id} {what_happened}. "
               "What it published before that, if anything, is in its task logs.")
    try:
        closed = compose.deployment_registry().close_if_open(dag_id, run_id, message)
    except RegistryError as exc:
        log.error("Could not close the deployment record of %s run %s (%s); the DAG's next run closes it",
                  dag_id, run_id, exc)
        return False
    if closed:
        log.warning("Deployment record of %s run %s closed as failed: %s", dag_id, run_id, message)
    return closed
