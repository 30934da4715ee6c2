"""What the DAG files share: default task arguments, run identity, error classification.

Imported at DAG parse time, so it stays light (no torch, open_clip or faiss).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from inspection_refresh.publish import PublishError
from inspection_refresh.storage import StorageError

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
            try:
                from airflow.sdk.exceptions import AirflowFailException
            except ImportError:  # older Task SDKs
                from airflow.exceptions import AirflowFailException
            raise AirflowFailException(f"{exc} (not retried: fix the input or configuration)") from exc
        raise


def run_identity(context: Any) -> tuple[str, bool, str]:
    """(run id, whether the scheduler started it, who deployed it) from a task context."""
    dag_run = context["dag_run"]
    run_type = str(getattr(dag_run, "run_type", "") or "")
    scheduled = run_type.lower().endswith("scheduled")
    user = getattr(dag_run, "triggering_user_name", None)
    deployed_by = "airflow-scheduler" if scheduled else f"airflow:{user}" if user else "airflow"
    return context["run_id"], scheduled, deployed_by[:50]
