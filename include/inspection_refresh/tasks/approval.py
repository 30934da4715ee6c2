"""The optional approval step before publishing: what a person is asked, and what they answered.

Each deployment DAG has an ``approve`` task (:class:`inspection_refresh.operators.PublishApproval`)
between building and publishing. When the run requires approval it asks through Airflow's
human-in-the-loop step (the task's "Required actions" in the UI); otherwise it passes at once.
Either way it records the run's ``approve`` stage here, beside the other stage records:

- ``ok`` — approved (``decision``: ``approved``, ``by``: who), not required, or nothing to approve;
- ``waiting`` — asked, no answer yet (what a run that ended meanwhile leaves);
- ``rejected`` — a person rejected it: the message is "rejected by <user>";
- ``timed_out`` — nobody answered within the request's timeout;
- ``failed`` — the step itself failed (e.g. the summary could not be built).
- ``blocked`` — the quality gate (mode ``block``) flagged everything the run would publish: the message
  names what (:mod:`inspection_refresh.tasks.gating`).

``publish`` refuses to publish unless the record says ``ok``, and ``register`` writes the
decision into the deployment row. An approval names what it approved: the request's ``targets``
(per artefact, :func:`target`: the staged version and the sha256 of a sorted manifest of its files)
are recorded when the person is asked, and ``publish`` recomputes them over what it is about to make
live and refuses anything else (:func:`require_as_approved`), so a version rebuilt after the answer
(``index_save`` or ``build`` cleared) is never published on an approval given for another one.
The record lives with the run's other stage records: in a work directory (a path) or a
:class:`~inspection_refresh.runstore.RunStore`, so the worker that publishes need not be the one
that asked. Nothing here imports Airflow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from inspection_refresh.files import tree_digest
from inspection_refresh.runstore import RunFileMissing, RunStore
from inspection_refresh.runtime import PermanentError
from inspection_refresh.tasks.common import NothingToDo
from inspection_refresh.tasks.stages import as_run_store

log = logging.getLogger(__name__)

STAGE = "approve"
APPROVED = "ok"
WAITING = "waiting"
REJECTED = "rejected"
TIMED_OUT = "timed_out"
FAILED = "failed"
BLOCKED = "blocked"
"""The quality gate (``block``) stopped everything the run would publish; nobody was asked."""


@dataclass(frozen=True)
class ApprovalRequest:
    """What the approver is shown: a subject line, a Markdown body, and the same numbers as data."""

    subject: str
    body: str
    summary: dict[str, Any] = field(default_factory=dict)
    """Saved in the stage record (and so in the deployment row's ``approval``)."""
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Exactly what would be published, by artefact (``normal``, a product code): :func:`target` each."""


RECORD = f"stage-{STAGE}.json"


def record_path(work_dir: Path) -> Path:
    return Path(work_dir) / RECORD


def read_decision(work_dir: Path | RunStore) -> dict[str, Any] | None:
    """The run's ``approve`` stage record, or ``None`` if the step has not run."""
    try:
        return as_run_store(work_dir).read_json(RECORD)
    except RunFileMissing:
        return None


def record_decision(work_dir: Path | RunStore, status: str, message: str = "", **facts: Any) -> dict[str, Any]:
    """Save the ``approve`` stage record, keeping the facts an earlier save of this run recorded
    (the summary the approver saw stays beside the answer)."""
    previous = read_decision(work_dir) or {}
    record = {"stage": STAGE, "status": status, "message": message, "seconds": 0.0,
              "facts": {**previous.get("facts", {}), **facts}}
    as_run_store(work_dir).write_json(RECORD, record)
    return record


def responder_name(user: Any) -> str:
    """Who answered, from the HITL response's ``responded_by_user`` (``{"id", "name"}``)."""
    if isinstance(user, dict):
        return str(user.get("name") or user.get("id") or "an unknown user")
    return str(user) if user else "an unknown user"


def record_answer(work_dir: Path | RunStore, chosen: str | None, user: Any, responded_at: Any,
                  approve_option: str = "Approve") -> dict[str, Any]:
    """Record a person's answer to the approval request."""
    who = responder_name(user)
    at = responded_at.isoformat() if isinstance(responded_at, datetime) else responded_at
    if chosen == approve_option:
        log.info("Publishing approved by %s", who)
        return record_decision(work_dir, APPROVED, "", required=True, decision="approved", by=who, at=at)
    log.warning("Publishing rejected by %s: nothing is published, the live version stays", who)
    return record_decision(work_dir, REJECTED, f"rejected by {who}", required=True, decision="rejected",
                           by=who, at=at)


def record_timeout(work_dir: Path | RunStore, error: str | None = None) -> dict[str, Any]:
    """Record that nobody answered before the request's timeout."""
    previous = (read_decision(work_dir) or {}).get("facts", {})
    waited = previous.get("timeout")
    message = (f"approval timed out: nobody approved or rejected publishing within {waited or 'the timeout'}"
               f" (asked at {previous.get('asked_at', '?')})")
    log.warning("%s%s", message, f" ({error})" if error else "")
    return record_decision(work_dir, TIMED_OUT, message, required=True, decision="timed out",
                           at=datetime.now(timezone.utc).isoformat())


def is_approved(work_dir: Path | RunStore) -> bool:
    record = read_decision(work_dir)
    return bool(record) and record["status"] == APPROVED


def require_approved(work_dir: Path | RunStore, what: str) -> None:
    """Raise :class:`NothingToDo` unless the run's approval step let ``what`` be published.

    ``what`` names the artefact for the message (e.g. "normal index version X").
    """
    record = read_decision(work_dir)
    if record is None:
        raise NothingToDo(f"{what} is not published: the run's approval step did not run")
    if record["status"] != APPROVED:
        raise NothingToDo(f"{what} is not published: {record['message'] or record['status']}")


def target(version: str | None, files: Mapping[str, tuple[int, str]], **inputs: str) -> dict[str, Any]:
    """What an approval names for one artefact: ``version`` (``None`` where publishing assigns it, as for a
    PatchCore bank), ``sha256`` over ``files`` (:func:`~inspection_refresh.files.tree_digest` of path ->
    (size, sha256)), their count and bytes, and ``inputs``: digests of what publishing adds beside them
    (e.g. the images a bank publishes as ``ok/``)."""
    return {"version": version, "sha256": tree_digest(files), "files": len(files),
            "bytes": sum(size for size, _ in files.values()), **inputs}


class NotWhatWasApproved(PermanentError):
    """``publish`` found another version or other files than the approval named: a retry cannot fix it."""


def _described(named: dict[str, Any] | None) -> str:
    """A :func:`target` in a refusal's words: ``version X, sha256 <16 hex>…, N files``."""
    if not named:
        return "nothing"
    version = f"version {named['version']}, " if named.get("version") else ""
    return f"{version}sha256 {named['sha256'][:16]}…, {named['files']} files"


def require_as_approved(work_dir: Path | RunStore, name: str, what: str,
                        now: Callable[[], dict[str, Any]]) -> None:
    """Raise :class:`NotWhatWasApproved` unless ``now()`` (:func:`target` over what ``publish`` is about to
    make live) is what the person approved for ``name``; call it after :func:`require_approved`.

    Runs that asked nobody (approval not required, nothing to approve) are not checked, nor an approval
    recorded before approvals named their targets (it is logged).
    """
    facts = (read_decision(work_dir) or {}).get("facts", {})
    if facts.get("decision") != "approved":
        return
    targets = facts.get("targets")
    if targets is None:
        log.warning("The approval of %s names no version or digest (asked by an older release): not checked", what)
        return
    approved, current = targets.get(name), now()
    if approved != current:
        raise NotWhatWasApproved(
            f"{what} is not what was approved (approved {_described(approved)}; now {_described(current)}): "
            "nothing published; clear the run's approve task to ask again")
    log.info("%s is what %s approved (%s)", what, facts.get("by", "the approver"), _described(current))


def decision_facts(record: dict[str, Any] | None) -> dict[str, Any]:
    """The approval part of a deployment row's ``result_data``."""
    if not record:
        return {"status": "not run"}
    facts = record.get("facts", {})
    keep = ("required", "decision", "by", "at", "asked_at", "timeout", "summary", "targets")
    return {"status": record["status"], **{k: facts[k] for k in keep if k in facts}}


def blocked_message(record: dict[str, Any] | None) -> str | None:
    """Why the approval step stopped publishing ("rejected by alice", "approval timed out ..."),
    or ``None`` if it did not stop it."""
    if record is None or record["status"] == APPROVED:
        return None
    if record["status"] == WAITING:
        return "the approval step did not finish (the run ended while it waited for an answer)"
    return record["message"] or f"the approval step ended {record['status']}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A small Markdown table for the approval request's body."""
    def cell(value: Any) -> str:
        return "—" if value is None else str(value).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
