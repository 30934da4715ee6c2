"""The service's ``deployment_logs`` history and ``products`` list, over any DB-API connection to MySQL.

One Airflow DAG run is one deployment row, found again by the DAG id and run id
kept in ``result_data`` (``airflow_dag_id``, ``airflow_run_id``) whatever its
``deploy_type``: task retries update the same row instead of adding another, the
two CLIP DAGs (same ``deploy_type``, same scheduled run id) keep a row each, and
the closing task can always finish it as ``completed`` or ``failed`` even if the
opening task never ran. Rows left open by runs that ended without closing them
are closed by the DAG's failure callback (runs an operator marked failed: by the listener in
``inspection_refresh.listeners``) or, failing that, by its next run.

The connection comes from the caller (:func:`inspection_refresh.compose.deployment_registry`
opens the Airflow MySQL connection ``deploy_db``), so this module needs no Airflow; statements,
connection errors and named locks are :class:`~inspection_refresh.database.Database`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from inspection_refresh.database import Database, RegistryError

log = logging.getLogger(__name__)

STATUSES = ("pending", "running", "completed", "failed")
OPEN_STATUSES = ("pending", "running")
FINAL_STATUSES = ("completed", "failed")

MESSAGE_LIMIT_BYTES = 65_535
"""``result_message`` is a TEXT column: 65,535 bytes (of UTF-8 here), not characters."""
CUT_MARKER = "… [cut]"

LOCK_WAIT_SECONDS = 10
ACCESS_DENIED_ERRORS = (1044, 1142)
"""MySQL/MariaDB error codes for a refused statement (ER_DBACCESS_DENIED_ERROR, ER_TABLEACCESS_DENIED_ERROR)."""

# The row key: (DAG id, run id) in result_data. Functions, not JSON_VALUE, so MySQL 5.7 works too.
RUN_KEY_SQL = ("JSON_UNQUOTE(JSON_EXTRACT(result_data, '$.airflow_dag_id')) = %s "
               "AND JSON_UNQUOTE(JSON_EXTRACT(result_data, '$.airflow_run_id')) = %s")

RunStateLookup = Callable[[str, str], str | None]
"""``(dag_id, run_id) -> final Airflow state`` (``success``/``failed``), or None if unfinished or unknown."""

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


@dataclass(frozen=True)
class Product:
    product_id: int
    product_code: str
    product_name: str | None = None


def _truncate(text: str | None, limit: int) -> str | None:
    return None if text is None else text[:limit]


def fit_message(text: str, limit_bytes: int = MESSAGE_LIMIT_BYTES) -> str:
    """``text`` cut to ``limit_bytes`` of UTF-8 on a character boundary, ending with a visible marker."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit_bytes:
        return text
    room = limit_bytes - len(CUT_MARKER.encode("utf-8"))
    # A byte cut may split a multi-byte character: "ignore" drops that partial tail.
    return encoded[:room].decode("utf-8", errors="ignore") + CUT_MARKER


def _run_key(dag_id: str, run_id: str) -> dict[str, str]:
    return {"airflow_dag_id": dag_id, "airflow_run_id": run_id}


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, default=str)


def _mysql_error_code(exc: BaseException | None) -> int | None:
    code = exc.args[0] if exc is not None and exc.args else None
    return code if isinstance(code, int) else None


class DeploymentRegistry(Database):
    """Reads and writes the service's deployment history.

    :param connect: opens a new DB-API connection to the service's database (MySQLdb-like:
        ``%s`` placeholders, ``cursor.lastrowid``).
    :param conn_id: names that connection in messages (the Airflow connection id).
    """

    def __init__(self, connect: Callable[[], Any], conn_id: str) -> None:
        super().__init__(connect, conn_id)
        self._table_checked = False

    @contextmanager
    def _run_lock(self, dag_id: str, run_id: str) -> Iterator[Any]:
        """A connection holding a server-wide named lock on one run's row.

        The table has no unique key for (DAG id, run id) and its columns are fixed, so two
        writers of one run (a retry racing its late original) could both miss the row and
        insert one each; under the lock, find-then-insert is one step.
        """
        # Lock names are limited to 64 characters; run ids alone can be longer.
        name = "deployment_logs:" + hashlib.sha1(f"{dag_id}\n{run_id}".encode()).hexdigest()
        with self._connection() as conn, self._holding(conn, name, LOCK_WAIT_SECONDS, lambda: (
                f"the deployment_logs row of {dag_id} run {run_id} stayed locked by another writer for "
                f"{LOCK_WAIT_SECONDS}s; try again")):
            yield conn

    def ensure_tables(self) -> None:
        """Create ``deployment_logs`` if it is missing; checked once per registry object.

        Only the check runs when the table exists, so an account with SELECT, INSERT and
        UPDATE on it is enough. Never alters or drops existing data.
        """
        if self._table_checked:
            return
        # "\_": in LIKE an underscore matches any character.
        if not self._execute(r"SHOW TABLES LIKE 'deployment\_logs'", fetch=True):
            self._create_deployment_logs()
        self._table_checked = True

    def _create_deployment_logs(self) -> None:
        try:
            self._execute(CREATE_DEPLOYMENT_LOGS)
        except RegistryError as exc:
            if _mysql_error_code(exc.__cause__) not in ACCESS_DENIED_ERRORS:
                raise
            raise RegistryError(
                f"deployment_logs does not exist in the database of connection {self.conn_id!r} and its account "
                f"may not create it ({exc.__cause__.args[-1]}). Grant CREATE on that schema "
                "(GRANT CREATE ON <schema>.* TO <account>) or have an administrator create the table once "
                "(registry.CREATE_DEPLOYMENT_LOGS); after that, SELECT, INSERT and UPDATE on deployment_logs "
                "are enough."
            ) from exc

    def _find(self, conn: Any, dag_id: str, run_id: str) -> dict[str, Any] | None:
        rows = self._run(
            conn, f"SELECT * FROM deployment_logs WHERE {RUN_KEY_SQL} ORDER BY deploy_id DESC LIMIT 1",
            (dag_id, run_id)).rows
        return _decode(rows[0]) if rows else None

    def find_run(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        """The row of this DAG run (whatever its ``deploy_type``), if any."""
        with self._connection() as conn:
            return self._find(conn, dag_id, run_id)

    def start(
        self,
        deploy_type: str,
        dag_id: str,
        run_id: str,
        *,
        product_id: int | None = None,
        deployed_by: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Open (or re-open on retry) this DAG run's row as ``running``; return its ``deploy_id``."""
        self.ensure_tables()
        data = {**(details or {}), **_run_key(dag_id, run_id)}
        with self._run_lock(dag_id, run_id) as conn:
            existing = self._find(conn, dag_id, run_id)
            if existing:
                self._run(conn, "UPDATE deployment_logs SET status = 'running', completed_at = NULL, "
                                "result_data = %s WHERE deploy_id = %s",
                          (_json({**(existing.get("result_data") or {}), **data}), existing["deploy_id"]))
                return int(existing["deploy_id"])
            deploy_id = self._run(
                conn, "INSERT INTO deployment_logs (deploy_type, product_id, status, result_message, result_data, "
                      "deployed_by) VALUES (%s, %s, 'running', %s, %s, %s)",
                (deploy_type, product_id, "started", _json(data), _truncate(deployed_by, 50))).lastrowid
        log.info("Deployment %s #%s is running (%s run %s)", deploy_type, deploy_id, dag_id, run_id)
        return deploy_id

    def finish(
        self,
        deploy_type: str,
        dag_id: str,
        run_id: str,
        *,
        status: str,
        message: str,
        result_data: dict[str, Any] | None = None,
        product_id: int | None = None,
        deployed_by: str | None = None,
    ) -> int:
        """Close this DAG run's row as ``completed`` or ``failed`` (inserting it if it was never opened)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"a deployment ends 'completed' or 'failed', not {status!r}")
        self.ensure_tables()
        text = fit_message(message)
        with self._run_lock(dag_id, run_id) as conn:
            existing = self._find(conn, dag_id, run_id)
            payload = _json({**((existing or {}).get("result_data") or {}), **(result_data or {}),
                             **_run_key(dag_id, run_id)})
            if existing:
                deploy_id = int(existing["deploy_id"])
                self._run(conn, "UPDATE deployment_logs SET status = %s, completed_at = NOW(), result_message = %s, "
                                "result_data = %s WHERE deploy_id = %s", (status, text, payload, deploy_id))
            else:
                deploy_id = self._run(
                    conn, "INSERT INTO deployment_logs (deploy_type, product_id, status, completed_at, "
                          "result_message, result_data, deployed_by) VALUES (%s, %s, %s, NOW(), %s, %s, %s)",
                    (deploy_type, product_id, status, text, payload, _truncate(deployed_by, 50))).lastrowid
        log.info("Deployment %s #%s %s: %s", deploy_type, deploy_id, status, message)  # uncut, unlike the row
        return deploy_id

    def closed_outcome(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        """What this DAG run recorded once its row was closed: its result_data with ``deploy_id``,
        ``status`` and ``message``; None while the row is missing or still open."""
        self.ensure_tables()
        row = self.find_run(dag_id, run_id)
        if row is None or row["status"] in OPEN_STATUSES:
            return None
        return {**(row.get("result_data") or {}), "deploy_id": int(row["deploy_id"]), "status": row["status"],
                "message": row["result_message"]}

    def close_if_open(self, dag_id: str, run_id: str, message: str) -> bool:
        """Close this DAG run's row as ``failed`` if it is still open; True if it was.

        A completed or failed row is left as its run recorded it.
        """
        self.ensure_tables()
        with self._run_lock(dag_id, run_id) as conn:
            row = self._find(conn, dag_id, run_id)
            return row is not None and self._close_as_failed(conn, int(row["deploy_id"]), message)

    def close_abandoned_runs(self, dag_id: str, current_run_id: str, finished_state: RunStateLookup) -> list[int]:
        """Close as ``failed`` the rows earlier runs of this DAG left open although Airflow says they ended.

        A run whose register task and failure callback (or, marked failed by an operator, the
        listener) could not reach the database (an outage) leaves its row ``running``; the DAG's
        next run tidies it. Rows whose run Airflow reports unfinished or does not know
        (``finished_state`` gives None) are left alone. Returns the ``deploy_id`` of each row closed.
        """
        self.ensure_tables()
        open_rows = self._execute(
            "SELECT deploy_id, JSON_UNQUOTE(JSON_EXTRACT(result_data, '$.airflow_run_id')) AS run_id "
            "FROM deployment_logs WHERE status IN ('pending', 'running') "
            "AND JSON_UNQUOTE(JSON_EXTRACT(result_data, '$.airflow_dag_id')) = %s ORDER BY deploy_id",
            (dag_id,), fetch=True)
        closed = []
        for row in open_rows:
            state = None if row["run_id"] == current_run_id else finished_state(dag_id, row["run_id"])
            if state is None:
                continue
            message = (f"closed by run {current_run_id}: Airflow run {row['run_id']} ended {state} "
                       "without closing its deployment record")
            with self._run_lock(dag_id, row["run_id"]) as conn:
                if self._close_as_failed(conn, int(row["deploy_id"]), message):
                    closed.append(int(row["deploy_id"]))
                    log.warning("Deployment #%s: %s", row["deploy_id"], message)
        return closed

    def _close_as_failed(self, conn: Any, deploy_id: int, message: str) -> bool:
        """Mark one still-open row failed; False if it had been closed meanwhile."""
        return self._run(
            conn, "UPDATE deployment_logs SET status = 'failed', completed_at = NOW(), result_message = %s "
                  "WHERE deploy_id = %s AND status IN ('pending', 'running')",
            (fit_message(message), deploy_id)).rowcount > 0

    def report_progress(self, dag_id: str, run_id: str, stage: str, figures: dict[str, Any]) -> bool:
        """Set ``result_data.progress[stage]`` of this run's row to ``figures``, only while the row is
        ``running`` (a finished row is never changed); True if a row was updated.

        One UPDATE, no lock: the other stages' figures and keys are kept (JSON_MERGE_PATCH), so
        concurrent stages (several products' builds) do not overwrite each other.
        """
        patch = _json({stage: figures})
        with self._connection() as conn:
            return self._run(
                conn, "UPDATE deployment_logs SET result_data = JSON_SET(COALESCE(result_data, JSON_OBJECT()), "
                      "'$.progress', JSON_MERGE_PATCH(COALESCE(JSON_EXTRACT(result_data, '$.progress'), "
                      f"JSON_OBJECT()), %s)) WHERE status = 'running' AND {RUN_KEY_SQL}",
                (patch, dag_id, run_id)).rowcount > 0

    def running_rows(self, dag_ids: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
        """Rows still ``running`` of these DAGs, by (DAG id, run id) (read only; newest row of a run wins)."""
        if not dag_ids:
            return {}
        rows = self._execute(
            "SELECT * FROM deployment_logs WHERE status = 'running' AND "
            "JSON_UNQUOTE(JSON_EXTRACT(result_data, '$.airflow_dag_id')) IN (" + ", ".join(["%s"] * len(dag_ids))
            + ") ORDER BY deploy_id", tuple(dag_ids), fetch=True)
        found = {}
        for row in map(_decode, rows):
            data = row.get("result_data") if isinstance(row.get("result_data"), dict) else {}
            found[(str(data.get("airflow_dag_id")), str(data.get("airflow_run_id")))] = row
        return found

    def history(self, limit: int = 20, deploy_type: str | None = None) -> list[dict[str, Any]]:
        """Newest first, as the service's admin page lists them."""
        where, params = ("WHERE deploy_type = %s", (deploy_type,)) if deploy_type else ("", ())
        rows = self._execute(
            f"SELECT * FROM deployment_logs {where} ORDER BY deploy_id DESC LIMIT %s",
            (*params, int(limit)), fetch=True,
        )
        return [_decode(row) for row in rows]

    def history_page(self, *, limit: int = 50, offset: int = 0, deploy_type: str | None = None,
                     status: str | None = None, dag_ids: list[str] | None = None) -> tuple[list[dict[str, Any]], int]:
        """One page of rows, newest first, and how many rows match in all (read only).

        ``deploy_type`` and ``status`` narrow the rows to equal values; ``dag_ids`` (if not None) to
        rows whose ``result_data.airflow_dag_id`` is one of them (an empty list matches nothing).
        """
        conditions, params = [], []
        if deploy_type:
            conditions.append("deploy_type = %s")
            params.append(deploy_type)
        if status:
            conditions.append("status = %s")
            params.append(status)
        if dag_ids is not None:
            if not dag_ids:
                return [], 0
            conditions.append("JSON_UNQUOTE(JSON_EXTRACT(result_data, '$.airflow_dag_id')) IN ("
                              + ", ".join(["%s"] * len(dag_ids)) + ")")
            params.extend(dag_ids)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._connection() as conn:
            total = self._run(conn, f"SELECT COUNT(*) AS total FROM deployment_logs {where}", tuple(params)).rows
            rows = self._run(conn, f"SELECT * FROM deployment_logs {where} ORDER BY deploy_id DESC LIMIT %s OFFSET %s",
                             (*params, max(0, int(limit)), max(0, int(offset)))).rows
        return [_decode(row) for row in rows], int(total[0]["total"])

    def deploy_types(self) -> list[str]:
        """The ``deploy_type`` values present in the table, sorted (read only)."""
        rows = self._execute("SELECT DISTINCT deploy_type FROM deployment_logs ORDER BY deploy_type", fetch=True)
        return [str(row["deploy_type"]) for row in rows]

    def find_by_result_values(self, lookups: list[tuple[str, dict[str, str]]]) -> list[dict[str, Any] | None]:
        """For each ``(deploy_type, {json_path: value})``, the newest row of that type whose ``result_data``
        has every value at its path (e.g. ``{"$.index_type": "normal", "$.version": V}``), or None."""
        return [rows[0] if rows else None for rows in self.newest_by_result_values(lookups, 1)]

    def newest_by_result_values(self, lookups: list[tuple[str, dict[str, str]]],
                                limit: int = 5) -> list[list[dict[str, Any]]]:
        """For each ``(deploy_type, {json_path: value})``, up to ``limit`` rows of that type whose
        ``result_data`` has every value at its path, newest first.

        Read only; one connection for all lookups. The paths are passed as parameters, never
        spliced into the SQL.
        """
        found: list[list[dict[str, Any]]] = []
        with self._connection() as conn:
            for deploy_type, matches in lookups:
                where = "".join(" AND JSON_UNQUOTE(JSON_EXTRACT(result_data, %s)) = %s" for _ in matches)
                params = [deploy_type] + [item for pair in matches.items() for item in pair]
                rows = self._run(conn, f"SELECT * FROM deployment_logs WHERE deploy_type = %s{where} "
                                       "ORDER BY deploy_id DESC LIMIT %s", (*params, max(1, int(limit)))).rows
                found.append([_decode(row) for row in rows])
        return found

    def utc_offset_seconds(self) -> int:
        """How far the database session's clock is ahead of UTC: its ``started_at``/``completed_at`` are
        written in that zone (``NOW()``, ``CURRENT_TIMESTAMP``), without saying which."""
        rows = self._execute("SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW()) AS seconds_ahead", fetch=True)
        return int(rows[0]["seconds_ahead"])

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
