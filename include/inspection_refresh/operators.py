"""What the DAG files share: default task arguments, routing, the DAG failure callback, and the
approval step before publishing (Airflow's HITL ``ApprovalOperator``).

Imported at DAG parse time, so it stays light (no torch, open_clip or faiss).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator

from inspection_refresh import quality_gate
from inspection_refresh.config import Settings
from inspection_refresh.notifications import (
    ApprovalWaitingNotifier, Notice, RunFailedNotifier, routes_configured, run_link, send,
)
from inspection_refresh.progress import format_duration
from inspection_refresh.runtime import close_open_deployment
from inspection_refresh.tasks import approval, gating

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


def deployment_dag_args() -> dict[str, Any]:
    """The ``DAG(...)`` keywords every deployment DAG shares: no catch-up, one run at a time, retries
    with backoff (:data:`DEFAULT_ARGS`), and a failure callback that closes the run's deployment record."""
    return {"start_date": START_DATE, "catchup": False, "max_active_runs": 1,
            "on_failure_callback": close_deployment_on_failure, "default_args": DEFAULT_ARGS}


def queue_args(settings: Settings, *, heavy: bool = False) -> dict[str, str]:
    """An operator's routing keyword: ``{"queue": name}``, or ``{}`` for Airflow's default queue.

    :param heavy: the task is compute-heavy (CLIP ``embed``, PatchCore ``build``): ``heavy_queue``
        first, then ``default_queue``.
    """
    queue = (settings.heavy_queue if heavy else None) or settings.default_queue
    return {"queue": queue} if queue else {}


def executor_args(settings: Settings, *, heavy: bool = False) -> dict:
    """An operator's ``executor_config`` keyword for the KubernetesExecutor: for a heavy task, when
    ``heavy_pod_gpus`` is set, a ``pod_override`` whose ``base`` container requests that many
    ``nvidia.com/gpu``; else ``{}``.

    The pod is a ``kubernetes.client`` ``V1Pod`` (the only form Airflow's Kubernetes provider takes),
    built here, lazily: without the setting the kubernetes client is never imported.
    """
    if not heavy or not settings.heavy_pod_gpus:
        return {}
    try:
        from kubernetes.client import models as k8s
    except ImportError as exc:
        raise RuntimeError(
            "INSPECTION_HEAVY_POD_GPUS is set, but the kubernetes client is not installed: install "
            "apache-airflow-providers-cncf-kubernetes (the KubernetesExecutor needs it anyway) or unset it"
        ) from exc
    gpus = str(settings.heavy_pod_gpus)
    container = k8s.V1Container(name="base", resources=k8s.V1ResourceRequirements(
        requests={"nvidia.com/gpu": gpus}, limits={"nvidia.com/gpu": gpus}))
    return {"executor_config": {"pod_override": k8s.V1Pod(spec=k8s.V1PodSpec(containers=[container]))}}


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
    Then, with notifications on, it tells people (:class:`RunFailedNotifier`: the row's message, a link).
    """
    close_open_deployment(context["dag"].dag_id, context["run_id"],
                          f"failed before recording its outcome: {_failure_reason(context)}")
    RunFailedNotifier(describe_failure=_failure_reason)(context)  # after closing: it sends the row's message


# ----------------------------------------------------------------------------- approval before publishing

APPROVAL_PARAM = "require_approval"
"""The DAG param that makes a manual run wait for a person's approval before publishing."""
QUALITY_PARAM = gating.QUALITY_PARAM
"""The DAG param choosing a manual run's quality gate mode (:mod:`inspection_refresh.quality_gate`)."""
APPROVAL_PUBLISH_MARGIN = timedelta(minutes=20)
"""Time left, after the approval request times out, for publishing and recording before the
run's ``dagrun_timeout``: the request's own timeout, not the run's, ends an unanswered wait."""
APPROVAL_MIN_WAIT = timedelta(minutes=5)


def quality_gate_param(settings: Settings) -> Any:
    """The ``quality_gate`` DAG param: a manual run's gate mode (scheduled runs: ``INSPECTION_QUALITY_GATE``)."""
    from airflow.sdk import Param

    return Param(gating.MANUAL_DEFAULT, type="string", enum=list(quality_gate.MODES), title="Quality gate",
                 description="What flagged data (suspected defects among normal images, duplicate or misfiled "
                             "images, a worse result than the live version) does to this run: off (not checked), "
                             "warn (publish, report it), approve (ask a person first), block (publish nothing "
                             "flagged; the live version stays). Scheduled runs use INSPECTION_QUALITY_GATE "
                             f"({settings.quality_gate}).")


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


def _tell_flagged(context: Any, decision: Any, settings: Settings) -> None:
    """One notification (when notifications are on) that a run publishes flagged data (gate ``warn``); a
    blocked run's failure and an approval the gate asks for send their own."""
    if not routes_configured(settings):
        return
    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    send(Notice(title=f"Publishing flagged data (quality gate warn): {dag_id} {run_id}",
                text=f"Airflow DAG {dag_id}, run {run_id}, publishes although its quality checks flagged:\n"
                     + "\n".join(f"- {reason}" for reason in decision.reasons),
                link=run_link(dag_id, run_id), link_label="The run in Airflow", level="warning"), settings)


class PublishApproval(ApprovalOperator):
    """Airflow's approval step (Approve / Reject) before publishing; passes at once when not required.

    The run requires approval when its ``require_approval`` param is true, or it is a scheduled run
    and ``approve_scheduled``. Then ``summarize(run)`` describes what would change (an
    :class:`~inspection_refresh.tasks.approval.ApprovalRequest`, or ``None`` when nothing would be
    published, which needs no approval), and the task waits in Airflow's ``awaiting_input`` state
    until someone answers on the task's "Required actions" page (or the HITL REST API), or until the
    request times out (:func:`approval_wait`). The answer is recorded as the run's ``approve`` stage
    (:mod:`inspection_refresh.tasks.approval`), with the request's ``targets`` (each artefact's staged
    version and the sha256 of its files), which ``publish`` checks and ``register`` reports.
    Approve: downstream runs. Reject: the task succeeds and skips its downstream ``publish``. No
    answer in time: the task fails (``HITLTimeoutError``), so ``publish`` does not run either.

    ``current_run`` returns the pipeline's run object (its ``store`` and ``scheduled``); the
    callables are called inside the task, never at DAG parse time.
    """

    def __init__(self, *, current_run: Callable[[], Any], summarize: Callable[[Any], Any],
                 approve_scheduled: bool = False, longest_wait: timedelta = timedelta(hours=4),
                 check_quality: Callable[[Any, str], Any] | None = None,
                 nothing_to_approve: Callable[[Any], str | None] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("subject", "Publish this deployment?")  # replaced by the run's summary
        kwargs.setdefault("retries", 0)  # a retry would ask again: an answer, or its absence, is final
        kwargs.setdefault("notifiers", [ApprovalWaitingNotifier()])  # called once the request is written
        kwargs.setdefault("response_timeout", longest_wait)
        super().__init__(**kwargs)
        self.current_run = current_run
        self.summarize = summarize
        self.approve_scheduled = approve_scheduled
        self.longest_wait = longest_wait
        self.check_quality = check_quality
        self.nothing_to_approve = nothing_to_approve
        """``nothing_to_approve(run)``: why the run has nothing to approve (the task is skipped), or ``None``."""

    def _quality_gate(self, context: Any, run: Any) -> Any:
        """The quality gate's decision (``check_quality(run, mode)``, kept in the run store), or ``None``."""
        if self.check_quality is None:
            return None
        try:
            decision = self.check_quality(run, gating.gate_mode(context["params"], run.scheduled, run.settings))
        except BaseException as exc:
            approval.record_decision(run.store, approval.FAILED,
                                     f"could not check the quality gate: {type(exc).__name__}: {exc}")
            raise
        if decision is not None:
            gating.record_gate(run.store, decision)
            self.log.info("Quality gate (%s): %s%s", decision.mode, decision.action,
                          "".join(f"\n  - {reason}" for reason in decision.reasons) or " (nothing flagged)")
            if decision.action == quality_gate.PUBLISH and decision.findings:  # warn: nobody is asked, so tell
                _tell_flagged(context, decision, run.settings)
        return decision

    def execute(self, context: Any) -> Any:
        run = self.current_run()
        nothing = self.nothing_to_approve(run) if self.nothing_to_approve else None
        if nothing:  # skipped, not green: there was nothing to approve (nothing built, or the run failed early)
            approval.record_decision(run.store, approval.APPROVED, required=False, decision="nothing to approve")
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException(f"Nothing to approve: {nothing}")
        gate = self._quality_gate(context, run)
        if gate is not None and gate.all_blocked:
            message = "; ".join(gate.blocked.values())
            approval.record_decision(run.store, approval.BLOCKED, message, required=False, decision="blocked")
            self.log.warning("Nothing is published (quality gate mode block): %s", message)
            return {"required": False, "approved": False, "blocked": sorted(gate.blocked)}
        asked_by_gate = gate is not None and gate.action == quality_gate.ASK
        if asked_by_gate:
            self.log.info("Approval required: the quality gate (approve) flagged %s", ", ".join(gate.flagged))
        elif not approval_required(context["params"], run.scheduled, self.approve_scheduled):
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
        if gate is not None and gate.findings:  # first, where the approver starts reading (the subject stays)
            self.body = "\n".join([*quality_gate.markdown(gate), "", request.body])
        self.response_timeout = approval_wait(context, self.longest_wait)
        asked_at = datetime.now(timezone.utc)
        # What is approved is named now (version, sha256 of its files): publish refuses anything else.
        approval.record_decision(
            run.store, approval.WAITING, "", required=True, summary=request.summary, targets=request.targets,
            asked_at=asked_at.isoformat(), timeout=format_duration(self.response_timeout.total_seconds()),
            timeout_at=(asked_at + self.response_timeout).isoformat())
        self.log.info("Waiting up to %s for approval on this task's Required actions page%s:\n%s\n\n%s",
                      format_duration(self.response_timeout.total_seconds()), _required_actions_link(context),
                      request.subject, request.body)
        return super().execute(context)  # writes the request, parks the task in awaiting_input

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
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
