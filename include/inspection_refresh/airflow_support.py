"""What the DAG files share: default task arguments, run identity, error classification,
closing a failed run's deployment record, and the approval step before publishing.

Imported at DAG parse time, so it stays light (no torch, open_clip or faiss).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator

from inspection_refresh.publish import PublishError
from inspection_refresh.storage import StorageError

log = logging.getLogger(__name__)

START_DATE = datetime(2026, 1, 1, tzinfo=timezone.utc)

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "ml-platform",
    "retries": 3,
    "retry_delay": timedelta(seconds=float(os.environ.get("INSPECTION_RETRY_DELAY_SECONDS", "30"))),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}
"""Retries with exponential backoff; errors that a retry cannot fix fail at once (see below)."""


class PermanentError(RuntimeError):
    """Bad input or configuration: retrying will not help, the operator must act."""


def is_permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: wrong bucket/credentials/prefix, unreadable data, bad params."""
    if isinstance(exc, StorageError):
        return not getattr(exc, "transient", False)
    return isinstance(exc, (PermanentError, PublishError, ValueError, FileNotFoundError, PermissionError))


@contextmanager
def fail_permanent_errors() -> Iterator[None]:
    """Turn permanent errors into ``AirflowFailException`` so Airflow does not retry them."""
    try:
        yield
    except Exception as exc:
        if is_permanent(exc):
            raise _fail_exception()(f"{exc} (not retried: fix the input or configuration)") from exc
        raise


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


def _failure_reason(context: Mapping[str, Any]) -> str:
    """Why Airflow failed the run, in words, from a DAG failure callback's context."""
    reason = context.get("reason")
    if reason == "task_failure":
        ti = context.get("ti")
        return f"task {ti.task_id} failed" if ti is not None else "a task failed"
    if reason == "timed_out":
        return f"the run exceeded its dagrun_timeout ({getattr(context['dag'], 'dagrun_timeout', None)})"
    if reason == "all_tasks_deadlocked":
        return "no task could run any more (all tasks deadlocked)"
    return f"the run was marked failed ({reason})" if reason else "the run was marked failed"


def close_deployment_on_failure(context: Mapping[str, Any]) -> None:
    """DAG ``on_failure_callback``: close the run's ``deployment_logs`` row as failed if still open.

    The register task normally closes the row; this covers runs that fail before it could
    (register itself failing, a dagrun timeout, a deadlock). It never raises: with the
    database still down the error is logged and the DAG's next run closes the row.
    """
    close_open_deployment(context["dag"].dag_id, context["run_id"],
                          f"failed before recording its outcome: {_failure_reason(context)}")


def close_open_deployment(dag_id: str, run_id: str, what_happened: str) -> bool:
    """Close a run's ``deployment_logs`` row as failed if it is still open; True if it was.

    ``what_happened`` completes the sentence "Airflow run <run_id> ...". Never raises: with the
    database down the error is logged and the DAG's next run closes the row.
    """
    from inspection_refresh.registry import DeploymentRegistry, RegistryError

    message = (f"Airflow run {run_id} {what_happened}. "
               "What it published before that, if anything, is in its task logs.")
    try:
        closed = DeploymentRegistry().close_if_open(dag_id, run_id, message)
    except RegistryError as exc:
        log.error("Could not close the deployment record of %s run %s (%s); the DAG's next run closes it",
                  dag_id, run_id, exc)
        return False
    if closed:
        log.warning("Deployment record of %s run %s closed as failed: %s", dag_id, run_id, message)
    return closed


# ----------------------------------------------------------------------------- approval before publishing

APPROVAL_PARAM = "require_approval"
"""The DAG param that makes a manual run wait for a person's approval before publishing."""
APPROVAL_PUBLISH_MARGIN = timedelta(minutes=20)
"""Time left, after the approval request times out, for publishing and recording before the
run's ``dagrun_timeout``: the request's own timeout, not the run's, ends an unanswered wait."""
APPROVAL_MIN_WAIT = timedelta(minutes=5)


def approval_required(params: Mapping[str, Any], scheduled: bool, scheduled_default: bool) -> bool:
    """Whether this run waits for approval: the ``require_approval`` param (manual runs), or for
    scheduled runs (which run with the params' defaults) ``scheduled_default``."""
    return bool(params.get(APPROVAL_PARAM)) or (scheduled and scheduled_default)


def approval_wait(context: Mapping[str, Any], longest: timedelta, now: datetime | None = None) -> timedelta:
    """How long the approval request waits: ``longest``, but ending :data:`APPROVAL_PUBLISH_MARGIN`
    before the run's ``dagrun_timeout`` (counted from the run's start), and at least
    :data:`APPROVAL_MIN_WAIT` unless ``longest`` is shorter."""
    wait = longest
    run_timeout = getattr(context.get("dag"), "dagrun_timeout", None)
    started = getattr(context.get("dag_run"), "start_date", None)
    if run_timeout and started:
        now = now or datetime.now(timezone.utc)
        left = started + run_timeout - APPROVAL_PUBLISH_MARGIN - now
        wait = min(longest, max(left, min(APPROVAL_MIN_WAIT, longest)))
    return wait


def _required_actions_link(context: Any) -> str:
    """`` (<url>)``: the task's Required actions page, when ``[api] base_url`` says where the UI is."""
    try:
        return f" ({ApprovalOperator.generate_link_to_ui_from_context(context=context)})"
    except Exception:  # no base_url configured
        return ""


class PublishApproval(ApprovalOperator):
    """Airflow's approval step (Approve / Reject) before publishing; passes at once when not required.

    The run requires approval when its ``require_approval`` param is true, or it is a scheduled run
    and ``approve_scheduled``. Then ``summarize(run)`` describes what would change (an
    :class:`~inspection_refresh.tasks.approval.ApprovalRequest`, or ``None`` when nothing would be
    published, which needs no approval), and the task waits in Airflow's ``awaiting_input`` state
    until someone answers on the task's "Required actions" page (or the HITL REST API), or until the
    request times out (:func:`approval_wait`). The answer is recorded as the run's ``approve`` stage
    (:mod:`inspection_refresh.tasks.approval`), which ``publish`` checks and ``register`` reports.
    Approve: downstream runs. Reject: the task succeeds and skips its downstream ``publish``. No
    answer in time: the task fails (``HITLTimeoutError``), so ``publish`` does not run either.

    ``current_run`` returns the pipeline's run object (its ``store`` and ``scheduled``); the
    callables are called inside the task, never at DAG parse time.
    """

    def __init__(self, *, current_run: Callable[[], Any], summarize: Callable[[Any], Any],
                 approve_scheduled: bool = False, longest_wait: timedelta = timedelta(hours=4),
                 **kwargs: Any) -> None:
        kwargs.setdefault("subject", "Publish this deployment?")  # replaced by the run's summary
        kwargs.setdefault("retries", 0)  # a retry would ask again: an answer, or its absence, is final
        kwargs.setdefault("response_timeout", longest_wait)
        super().__init__(**kwargs)
        self.current_run = current_run
        self.summarize = summarize
        self.approve_scheduled = approve_scheduled
        self.longest_wait = longest_wait

    def execute(self, context: Any) -> Any:
        from inspection_refresh.tasks import approval

        run = self.current_run()
        if not approval_required(context["params"], run.scheduled, self.approve_scheduled):
            approval.record_decision(run.store, approval.APPROVED, required=False, decision="not required")
            self.log.info("Approval not required (%s is off): publishing without asking", APPROVAL_PARAM)
            return {"required": False, "approved": True}
        try:
            request = self.summarize(run)
        except BaseException as exc:
            approval.record_decision(run.store, approval.FAILED,
                                     f"could not summarise what would change: {type(exc).__name__}: {exc}")
            raise
        if request is None:
            approval.record_decision(run.store, approval.APPROVED, required=True, decision="nothing to approve")
            self.log.info("Approval required, but this run would publish nothing: not asking")
            return {"required": True, "approved": True}
        self.subject, self.body = request.subject, request.body
        self.response_timeout = approval_wait(context, self.longest_wait)
        asked_at = datetime.now(timezone.utc)
        approval.record_decision(
            run.store, approval.WAITING, "", required=True, summary=request.summary,
            asked_at=asked_at.isoformat(), timeout=str(self.response_timeout),
            timeout_at=(asked_at + self.response_timeout).isoformat())
        self.log.info("Waiting up to %s for approval on this task's Required actions page%s:\n%s\n\n%s",
                      self.response_timeout, _required_actions_link(context), request.subject, request.body)
        return super().execute(context)  # writes the request, parks the task in awaiting_input

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from inspection_refresh.tasks import approval

        work_dir = self.current_run().store  # the run's store: this may be another worker than execute's
        if "error" in event:
            if event.get("error_type") == "timeout":
                approval.record_timeout(work_dir, event.get("error"))
            else:
                approval.record_decision(work_dir, approval.FAILED, f"the approval step failed: {event.get('error')}")
            return super().execute_complete(context, event)  # raises HITLTimeoutError / HITLTriggerEventError
        chosen = (event.get("chosen_options") or [None])[0]
        approval.record_answer(work_dir, chosen, event.get("responded_by_user"), event.get("responded_at"),
                               approve_option=self.APPROVE)
        return super().execute_complete(context, event)  # on Reject: skips the downstream publish
