"""The service's ``deployment_logs`` history and ``products`` list, through an Airflow MySQL connection.

One Airflow DAG run is one deployment row. The row is found again by the run id
kept in ``result_data.airflow_run_id``, so task retries update the same row
instead of adding another, and the closing task can always finish it as
``completed`` or ``failed`` even if the opening task never ran.
"""

from __future__ import annotations

import json
import logging
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from inspection_refresh.config import get_settings

log = logging.getLogger(__name__)

STATUSES = ("pending", "running", "completed", "failed")

# Same columns as production (CONTRACT.md); created only when missing.
CREATE_DEPLOYMENT_LOGS = """
CREATE TABLE IF NOT EXISTS deployment_logs (
    deploy_id INT PRIMARY KEY AUTO_INCREMENT,
    deploy_type VARCHAR(50) NOT NULL,
    product_id INT NULL,
    status VARCHAR(20) NOT NULL,
    started_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    completed_at DATETIME NULL,
    result_message TEXT NULL,
    result_data JSON NULL,
    deployed_by VARCHAR(50) NULL
)
"""

CREATE_PRODUCTS = """
CREATE TABLE IF NOT EXISTS products (
    product_id INT PRIMARY KEY AUTO_INCREMENT,
    product_code VARCHAR(50) NOT NULL,
    product_name VARCHAR(100) NULL,
    description TEXT NULL,
    is_active TINYINT(1) DEFAULT 1,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP
)
"""


class RegistryError(RuntimeError):
    """The deployment history could not be read or written."""


@dataclass(frozen=True)
class Product:
    product_id: int
    product_code: str
    product_name: str | None = None


def _truncate(text: str | None, limit: int) -> str | None:
    return None if text is None else text[:limit]


class DeploymentRegistry:
    """Reads and writes the service's deployment history.

    :param conn_id: Airflow connection (type ``mysql``); default from settings (``deploy_db``).
    """

    def __init__(self, conn_id: str | None = None) -> None:
        self.conn_id = conn_id or get_settings().db_conn_id

    @cached_property
    def hook(self):
        from airflow.providers.mysql.hooks.mysql import MySqlHook

        return MySqlHook(mysql_conn_id=self.conn_id)

    def _execute(self, sql: str, params: tuple = (), *, fetch: bool = False) -> Any:
        try:
            with closing(self.hook.get_conn()) as conn:
                with closing(conn.cursor()) as cursor:
                    cursor.execute(sql, params)
                    if fetch:
                        columns = [c[0] for c in cursor.description]
                        return [dict(zip(columns, row)) for row in cursor.fetchall()]
                    conn.commit()
                    return cursor.lastrowid
        except Exception as exc:
            raise RegistryError(
                f"database connection {self.conn_id!r}: {type(exc).__name__}: {exc}. "
                "Check the connection's host, schema and credentials."
            ) from exc

    def ensure_tables(self) -> None:
        """Create ``deployment_logs`` if missing (never alters or drops existing data)."""
        self._execute(CREATE_DEPLOYMENT_LOGS)

    def find_run(self, deploy_type: str, run_id: str) -> dict[str, Any] | None:
        """The row this Airflow run opened, if any."""
        rows = self._execute(
            "SELECT * FROM deployment_logs WHERE deploy_type = %s "
            "AND JSON_UNQUOTE(JSON_EXTRACT(result_data, '$.airflow_run_id')) = %s "
            "ORDER BY deploy_id DESC LIMIT 1",
            (deploy_type, run_id), fetch=True,
        )
        return _decode(rows[0]) if rows else None

    def start(
        self,
        deploy_type: str,
        run_id: str,
        *,
        product_id: int | None = None,
        deployed_by: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Open (or re-open on retry) this run's row as ``running``; return its ``deploy_id``."""
        self.ensure_tables()
        data = {"airflow_run_id": run_id, **(details or {})}
        existing = self.find_run(deploy_type, run_id)
        if existing:
            self._execute(
                "UPDATE deployment_logs SET status = 'running', completed_at = NULL, result_data = %s "
                "WHERE deploy_id = %s",
                (json.dumps({**(existing.get("result_data") or {}), **data}, default=str), existing["deploy_id"]),
            )
            return int(existing["deploy_id"])
        deploy_id = self._execute(
            "INSERT INTO deployment_logs (deploy_type, product_id, status, result_message, result_data, deployed_by) "
            "VALUES (%s, %s, 'running', %s, %s, %s)",
            (deploy_type, product_id, "started", json.dumps(data, default=str), _truncate(deployed_by, 50)),
        )
        log.info("Deployment %s #%s is running (run %s)", deploy_type, deploy_id, run_id)
        return int(deploy_id)

    def finish(
        self,
        deploy_type: str,
        run_id: str,
        *,
        status: str,
        message: str,
        result_data: dict[str, Any] | None = None,
        product_id: int | None = None,
        deployed_by: str | None = None,
    ) -> int:
        """Close this run's row as ``completed`` or ``failed`` (inserting it if it was never opened)."""
        if status not in ("completed", "failed"):
            raise ValueError(f"a deployment ends 'completed' or 'failed', not {status!r}")
        self.ensure_tables()
        existing = self.find_run(deploy_type, run_id)
        data = {**((existing or {}).get("result_data") or {}), **(result_data or {}), "airflow_run_id": run_id}
        payload = json.dumps(data, default=str)
        if existing:
            self._execute(
                "UPDATE deployment_logs SET status = %s, completed_at = NOW(), result_message = %s, "
                "result_data = %s WHERE deploy_id = %s",
                (status, message, payload, existing["deploy_id"]),
            )
            deploy_id = int(existing["deploy_id"])
        else:
            deploy_id = int(self._execute(
                "INSERT INTO deployment_logs (deploy_type, product_id, status, completed_at, result_message, "
                "result_data, deployed_by) VALUES (%s, %s, %s, NOW(), %s, %s, %s)",
                (deploy_type, product_id, status, message, payload, _truncate(deployed_by, 50)),
            ))
        log.info("Deployment %s #%s %s: %s", deploy_type, deploy_id, status, message)
        return deploy_id

    def history(self, limit: int = 20, deploy_type: str | None = None) -> list[dict[str, Any]]:
        """Newest first, as the service's admin page lists them."""
        where, params = ("WHERE deploy_type = %s", (deploy_type,)) if deploy_type else ("", ())
        rows = self._execute(
            f"SELECT * FROM deployment_logs {where} ORDER BY deploy_id DESC LIMIT %s",
            (*params, int(limit)), fetch=True,
        )
        return [_decode(row) for row in rows]

    def products_by_id(self) -> dict[int, Product]:
        """Every product (active or not) by id, for naming images in index metadata."""
        rows = self._execute("SELECT product_id, product_code, product_name FROM products", fetch=True)
        return {int(r["product_id"]): Product(int(r["product_id"]), str(r["product_code"]), r.get("product_name"))
                for r in rows}

    def active_products(self) -> list[Product]:
        """Active rows of ``products`` (the service's product master)."""
        rows = self._execute(
            "SELECT product_id, product_code, product_name FROM products WHERE is_active = 1 ORDER BY product_id",
            fetch=True,
        )
        return [Product(int(r["product_id"]), str(r["product_code"]), r.get("product_name")) for r in rows]


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    raw = row.get("result_data")
    if isinstance(raw, (bytes, str)) and raw:
        try:
            row["result_data"] = json.loads(raw)
        except ValueError:
            pass
    for key in ("started_at", "completed_at"):
        if isinstance(row.get(key), datetime):
            row[key] = row[key].isoformat(sep=" ")
    return row
