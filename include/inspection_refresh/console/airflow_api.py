"""Triggering a DAG run through Airflow's public REST API, as the signed-in user.

The console never rolls anything back itself: it asks Airflow to run ``deployment_rollback``
(``POST /api/v2/dags/{dag_id}/dagRuns``) with the user's own JWT, so Airflow checks the user's
permission, records the trigger in its audit log and names the user as the run's triggerer.
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


def trigger_dag_run(api_url: str, token: str, dag_id: str, run_conf: dict[str, Any], note: str | None = None,
                    *, timeout: float = TIMEOUT_SECONDS) -> TriggerResult:
    """``POST {api_url}/api/v2/dags/{dag_id}/dagRuns`` with ``Authorization: Bearer {token}``.

    The run is manual with no logical date (``logical_date: null``), as the UI's Trigger button
    makes it. Returns Airflow's answer; never raises for an HTTP or connection error.
    """
    url = f"{api_url.rstrip('/')}/api/v2/dags/{quote(dag_id, safe='')}/dagRuns"
    body: dict[str, Any] = {"logical_date": None, "conf": run_conf}
    if note:
        body["note"] = note
    try:
        response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    except httpx.HTTPError as exc:
        return TriggerResult(False, f"could not reach Airflow's REST API at {api_url}: {type(exc).__name__}: {exc}")
    if response.is_success:
        try:
            run_id = str(response.json()["dag_run_id"])
        except (ValueError, KeyError, TypeError):
            return TriggerResult(False, f"Airflow answered {response.status_code} without a run id",
                                 status_code=response.status_code)
        return TriggerResult(True, f"run {run_id} triggered", run_id, response.status_code)
    return TriggerResult(False, f"Airflow refused ({response.status_code}): {_error_detail(response)}",
                         status_code=response.status_code)
