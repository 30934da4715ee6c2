"""What the History page shows: one page of ``deployment_logs``, each row with its outcome in words.

A row says what happened even collapsed: published, unchanged (nothing published, the live version
stays), rejected (the approval step said no), failed (with its message), rolled back or forward,
unpinned, running, or waiting for approval (with a link to the run's Required Actions page). Times
are UTC: the table's times are in the database session's zone, which is asked once per page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from inspection_refresh.console.data import number
from inspection_refresh.console.made_live import RunRef, db_time_utc
from inspection_refresh.registry import OPEN_STATUSES, STATUSES, DeploymentRegistry, RegistryError

HISTORY_PAGE_SIZE = 50
JSON_SHOWN_CHARS = 20_000
"""A row's result_data is shown pretty-printed up to this many characters (lists of skipped
objects can be long); the message column is at most 64 KB and shown whole."""
NOT_APPROVED = {"rejected": "rejected", "timed_out": "not approved", "waiting": "not approved"}
"""Approval step statuses (``tasks.approval``) that stopped publishing, and the outcome word for each."""

WaitingApprovals = Callable[[], dict[tuple[str, str], dict[str, Any]]]
"""Asked only when the page has an open row: ``(dag_id, run_id) -> {"task_id", "map_index", "subject"}``
of runs whose task waits for a person's answer (``airflow_api.waiting_approvals``)."""


@dataclass
class ApprovalTask:
    """A task instance waiting on its Required Actions page."""

    run: RunRef
    task_id: str
    map_index: int
    subject: str


@dataclass
class HistoryRow:
    deploy_id: int
    deploy_type: str
    status: str
    outcome: str
    """In a word or two: published, unchanged, rejected, failed, rolled back, running, waiting for approval…"""
    started_at: datetime | str | None
    completed_at: datetime | str | None
    deployed_by: str | None
    message: str
    run: RunRef | None
    summary: str
    """One line: what the row deployed, and for a failed or rejected row its message."""
    products: list[dict[str, Any]]
    """PatchCore rows: one dict per product (code, status, version, figures, error)."""
    result_json: str
    approval: ApprovalTask | None = None


@dataclass
class HistoryPage:
    rows: list[HistoryRow]
    total: int
    page: int
    pages: int
    deploy_types: list[str]
    statuses: tuple[str, ...] = STATUSES
    problem: str | None = None


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else ""


def _rollback_outcome(status: str, data: dict[str, Any], message: str) -> tuple[str, str]:
    artefact, before, after = data["artefact"], data.get("from_version"), data.get("to_version")
    if status == "failed":
        return "failed", _first_line(message) or f"{artefact}: {data.get('action') or 'rollback'} failed"
    if data.get("action") == "unpin":
        return "unpinned", f"{artefact}: unpin, version {before or '?'} stays live"
    word = "rolled forward" if before and after and after > before else "rolled back"  # ids sort by time
    return word, f"{artefact}: {before or '?'} → {after or '?'}"


def _approval_word(data: dict[str, Any]) -> str | None:
    approval = data.get("approval") if isinstance(data.get("approval"), dict) else {}
    return NOT_APPROVED.get(str(approval.get("status")))


def _clip_outcome(status: str, data: dict[str, Any], message: str) -> tuple[str, str]:
    base = f"{data['index_type']} index"
    if status == "failed":
        return _approval_word(data) or "failed", _first_line(message) or f"{base}: failed"
    if data.get("unchanged"):
        return "unchanged", f"{base}, version {data.get('version') or '?'} stays live (nothing published)"
    return "published", base + (f", version {data['version']}" if data.get("version") else "")


def _patchcore_outcome(status: str, data: dict[str, Any], message: str) -> tuple[str, str]:
    results = {code: r if isinstance(r, dict) else {} for code, r in data["products"].items()}
    if status == "failed":
        refused = all(r.get("not_approved") for r in results.values() if r.get("status") == "failed")
        word = (_approval_word(data) or "rejected") if refused and results else "failed"
        return word, _first_line(message) or "PatchCore banks: failed"
    states = {r.get("status") for r in results.values()}
    word = "published" if "published" in states else "unchanged" if "unchanged" in states else "completed"
    what = ", ".join(f"{code} {r.get('status', '?')}" + (f" {r['version']}" if r.get("version") else "")
                     for code, r in results.items())
    return word, what or _first_line(message)


def outcome(status: str, data: dict[str, Any], message: str) -> tuple[str, str]:
    """(outcome word, one-line what) of a closed row; an open one is ``running`` with what it builds."""
    if status in OPEN_STATUSES:
        what = (f"{data['index_type']} index" if "index_type" in data
                else str(data["artefact"]) if "artefact" in data else "")
        return status, what or _first_line(message)
    if "artefact" in data:
        return _rollback_outcome(status, data, message)
    if "index_type" in data:
        return _clip_outcome(status, data, message)
    if isinstance(data.get("products"), dict):
        return _patchcore_outcome(status, data, message)
    return status, _first_line(message)


def _products(data: dict[str, Any]) -> list[dict[str, Any]]:
    products = data.get("products")
    if not isinstance(products, dict):
        return []
    rows = []
    for code, result in products.items():
        result = result if isinstance(result, dict) else {}
        tau = result.get("tau") if isinstance(result.get("tau"), dict) else {}
        rows.append({"code": code, "status": result.get("status"), "version": result.get("version"),
                     "bank_size": result.get("bank_size"), "tau": number(tau.get("image")) if tau else "",
                     "auroc": number(result.get("auroc"), 3) if result.get("auroc") is not None else "",
                     "error": ": ".join(str(x) for x in (result.get("stage"), result.get("error")) if x)})
    return rows


def _history_row(row: dict[str, Any], utc_offset: int | None) -> HistoryRow:
    raw = row.get("result_data")
    data = raw if isinstance(raw, dict) else {}
    run = (RunRef(str(data["airflow_dag_id"]), str(data["airflow_run_id"]))
           if data.get("airflow_dag_id") and data.get("airflow_run_id") else None)
    shown = json.dumps(raw, indent=2, sort_keys=True, default=str) if raw is not None else ""
    if len(shown) > JSON_SHOWN_CHARS:
        shown = shown[:JSON_SHOWN_CHARS] + f"\n… [{len(shown) - JSON_SHOWN_CHARS} more characters not shown]"
    message, status = str(row.get("result_message") or ""), str(row["status"])
    word, what = outcome(status, data, message)
    return HistoryRow(
        deploy_id=int(row["deploy_id"]), deploy_type=str(row["deploy_type"]), status=status, outcome=word,
        started_at=db_time_utc(row.get("started_at"), utc_offset),
        completed_at=db_time_utc(row.get("completed_at"), utc_offset), deployed_by=row.get("deployed_by"),
        message=message, run=run, summary=what, products=_products(data), result_json=shown)


def _mark_waiting(rows: list[HistoryRow], waiting: WaitingApprovals | None) -> None:
    """Open rows whose run waits for a person's answer: ``waiting for approval``, with the task to open."""
    open_rows = [row for row in rows if row.status in OPEN_STATUSES and row.run is not None]
    if not open_rows or waiting is None:
        return
    tasks = waiting()
    for row in open_rows:
        found = tasks.get((row.run.dag_id, row.run.run_id)) if row.run else None
        if found:
            row.outcome = "waiting for approval"
            row.approval = ApprovalTask(row.run, found["task_id"], found["map_index"], found["subject"])
            row.summary = found["subject"] or row.summary


def history_page(registry: DeploymentRegistry, *, page: int = 1, deploy_type: str | None = None,
                 status: str | None = None, dag_ids: list[str] | None = None,
                 page_size: int = HISTORY_PAGE_SIZE, waiting: WaitingApprovals | None = None) -> HistoryPage:
    """One page of ``deployment_logs``, newest first; ``dag_ids`` limits it to those DAGs' rows (None: all)."""
    page = max(1, page)
    try:
        rows, total = registry.history_page(limit=page_size, offset=(page - 1) * page_size,
                                            deploy_type=deploy_type, status=status, dag_ids=dag_ids)
        types = registry.deploy_types()
        offset = registry.utc_offset_seconds() if rows else None
    except RegistryError as exc:
        if "doesn't exist" in str(exc):
            return HistoryPage([], 0, 1, 1, [], problem="no deployment has been recorded yet "
                                                         "(the deployment_logs table does not exist)")
        return HistoryPage([], 0, 1, 1, [], problem=f"deployment history unavailable: {exc}")
    shown = [_history_row(r, offset) for r in rows]
    _mark_waiting(shown, waiting)
    return HistoryPage(shown, total, page, max(1, math.ceil(total / page_size)), types)
