"""Airflow's public REST API, as the signed-in user: is a DAG paused, unpause it, trigger a run, which
runs wait for a person's answer.

The console never rolls anything back itself: it asks Airflow to run ``deployment_rollback``
(``POST /api/v2/dags/{dag_id}/dagRuns``) with the user's own JWT, so Airflow checks the user's
permission, records the trigger in its audit log and names the user as the run's triggerer. It first
asks whether the DAG is paused (``GET /api/v2/dags/{dag_id}``): a run of a paused DAG would sit
queued, so nothing is triggered then, and the page says how to unpause it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from airflow.configuration import conf

API_URL_ENV = "INSPECTION_AIRFLOW_API_URL"
"""Where the console reaches Airflow's REST API, when neither ``[api] base_url`` nor the API server's
own listening address is right (e.g. behind a proxy that the server itself cannot reach)."""
TIMEOUT_SECONDS = 20.0


@dataclass(frozen=True)
class TriggerResult:
    ok: bool
    detail: str
    """Airflow's answer in words: the run id, or its error."""
    run_id: str | None = None
    status_code: int | None = None


def airflow_api_url() -> str:
    """The base URL of Airflow's API server as seen from the API server itself.

    ``$INSPECTION_AIRFLOW_API_URL``, else ``[api] base_url``, else the server's own listening
    address (``[api] host``/``port``; a wildcard host means this machine). Never the request's
    ``Host`` header: the user's token must not be sent wherever a request claims to come from.
    """
    if os.environ.get(API_URL_ENV):
        return os.environ[API_URL_ENV].rstrip("/")
    base_url = conf.get("api", "base_url", fallback="") or ""
    if urlsplit(base_url).netloc:
        return base_url.rstrip("/")
    host = conf.get("api", "host", fallback="localhost") or "localhost"
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]", "") else host
    scheme = "https" if conf.get("api", "ssl_cert", fallback="") else "http"
    return f"{scheme}://{host}:{conf.getint('api', 'port', fallback=8080)}"


def _error_detail(response: httpx.Response) -> str:
    """Airflow's error message (``detail`` may be a string, or a list of validation errors)."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):
        return "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail)
    return str(detail)


@dataclass(frozen=True)
class DagPaused:
    """Whether a DAG is paused, or why that could not be asked (``error``)."""

    paused: bool | None
    error: str | None = None


def _request(method: str, url: str, token: str, timeout: float, **kwargs: Any) -> httpx.Response | str:
    """Airflow's response, or what went wrong reaching it (a string)."""
    try:
        return httpx.request(method, url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout, **kwargs)
    except httpx.HTTPError as exc:
        return f"could not reach Airflow's REST API at {urlsplit(url).netloc}: {type(exc).__name__}: {exc}"


def _dag_url(api_url: str, dag_id: str) -> str:
    return f"{api_url.rstrip('/')}/api/v2/dags/{quote(dag_id, safe='')}"


def dag_paused(api_url: str, token: str, dag_id: str, *, timeout: float = TIMEOUT_SECONDS) -> DagPaused:
    """``GET {api_url}/api/v2/dags/{dag_id}``: is the DAG paused? Never raises."""
    response = _request("GET", _dag_url(api_url, dag_id), token, timeout)
    if isinstance(response, str):
        return DagPaused(None, response)
    if not response.is_success:
        return DagPaused(None, f"Airflow refused ({response.status_code}): {_error_detail(response)}")
    try:
        return DagPaused(bool(response.json()["is_paused"]))
    except (ValueError, KeyError, TypeError):
        return DagPaused(None, f"Airflow answered {response.status_code} without is_paused")


def unpause_dag(api_url: str, token: str, dag_id: str, *, timeout: float = TIMEOUT_SECONDS) -> str | None:
    """``PATCH {api_url}/api/v2/dags/{dag_id}`` with ``is_paused: false`` (the DAG page's toggle); None when
    done, else Airflow's refusal in words."""
    response = _request("PATCH", _dag_url(api_url, dag_id), token, timeout, params={"update_mask": "is_paused"},
                        json={"is_paused": False})
    if isinstance(response, str):
        return response
    if not response.is_success:
        return f"Airflow refused to unpause {dag_id} ({response.status_code}): {_error_detail(response)}"
    return None


def waiting_approvals(api_url: str, token: str, *, timeout: float = TIMEOUT_SECONDS) -> dict[tuple[str, str], dict]:
    """Task instances waiting for a person's answer (Airflow's Human-in-the-loop requests without a response:
    ``GET /api/v2/dags/~/dagRuns/~/hitlDetails?response_received=false``), by ``(dag_id, run_id)``: each
    ``{"task_id", "map_index", "subject"}``. Empty when Airflow cannot be asked (the page then just lacks
    the links)."""
    response = _request("GET", f"{api_url.rstrip('/')}/api/v2/dags/~/dagRuns/~/hitlDetails", token, timeout,
                        params={"response_received": "false", "limit": 100})
    if isinstance(response, str) or not response.is_success:
        return {}
    try:
        details = response.json()["hitl_details"]
        return {(str(d["task_instance"]["dag_id"]), str(d["task_instance"]["dag_run_id"])): {
            "task_id": str(d["task_instance"]["task_id"]), "map_index": int(d["task_instance"].get("map_index", -1)),
            "subject": str(d.get("subject") or "")} for d in details}
    except (ValueError, KeyError, TypeError):
        return {}


def trigger_dag_run(api_url: str, token: str, dag_id: str, run_conf: dict[str, Any], note: str | None = None,
                    *, timeout: float = TIMEOUT_SECONDS) -> TriggerResult:
    """``POST {api_url}/api/v2/dags/{dag_id}/dagRuns`` with ``Authorization: Bearer {token}``.

    The run is manual with no logical date (``logical_date: null``), as the UI's Trigger button
    makes it. Returns Airflow's answer; never raises for an HTTP or connection error.
    """
    body: dict[str, Any] = {"logical_date": None, "conf": run_conf}
    if note:
        body["note"] = note
    response = _request("POST", f"{_dag_url(api_url, dag_id)}/dagRuns", token, timeout, json=body)
    if isinstance(response, str):
        return TriggerResult(False, response)
    if response.is_success:
        try:
            run_id = str(response.json()["dag_run_id"])
        except (ValueError, KeyError, TypeError):
            return TriggerResult(False, f"Airflow answered {response.status_code} without a run id",
                                 status_code=response.status_code)
        return TriggerResult(True, f"run {run_id} triggered", run_id, response.status_code)
    return TriggerResult(False, f"Airflow refused ({response.status_code}): {_error_detail(response)}",
                         status_code=response.status_code)
