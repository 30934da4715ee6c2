"""deployment_logs and products on a real MariaDB through the Airflow MySQL connection."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import SimpleNamespace

import pytest
from inspection_refresh import compose
from inspection_refresh.database import lock_name_for
from inspection_refresh.registry import CUT_MARKER, MESSAGE_LIMIT_BYTES, RegistryError, fit_message

NORMAL, DEFECT, PATCHCORE = "clip_index_normal", "clip_index_defect", "patchcore_memory_bank"

@pytest.fixture
def registry(mysql_database):
    return compose.deployment_registry()


def test_table_is_created_when_missing_and_existing_rows_are_kept(registry, sql):
    sql("DROP TABLE IF EXISTS deployment_logs")
    registry.ensure_tables()
    columns = [row["Field"] for row in sql("SHOW COLUMNS FROM deployment_logs")]
    assert columns == ["deploy_id", "deploy_type", "product_id", "status", "started_at", "completed_at",
                       "result_message", "result_data", "deployed_by"]
    sql("INSERT INTO deployment_logs (deploy_type, status, result_message) VALUES ('manual', 'completed', 'old')")
    registry.ensure_tables()
    assert sql("SELECT result_message FROM deployment_logs WHERE deploy_type = 'manual'") == [
        {"result_message": "old"}]


def test_a_run_has_exactly_one_row_through_retries(registry, sql):
    run_id = f"manual__{uuid.uuid4()}"
    first = registry.start("clip_rebuild", NORMAL, run_id, deployed_by="airflow:admin",
                           details={"index_type": "normal"})
    again = registry.start("clip_rebuild", NORMAL, run_id, details={"index_type": "normal"})  # a retried task
    assert first == again
    assert sql("SELECT status FROM deployment_logs WHERE deploy_id = %s", (first,)) == [{"status": "running"}]
    registry.finish("clip_rebuild", NORMAL, run_id, status="completed", message="done",
                    result_data={"num_images": 3, "embedding_dim": 512})
    rows = sql("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s", (run_id,))
    assert len(rows) == 1
    row = registry.find_run(NORMAL, run_id)
    assert row["status"] == "completed" and row["completed_at"] and row["deployed_by"] == "airflow:admin"
    assert row["result_data"] == {"airflow_dag_id": NORMAL, "airflow_run_id": run_id, "index_type": "normal",
                                  "num_images": 3, "embedding_dim": 512}


def test_finish_without_start_still_records_the_failure(registry):
    run_id = f"scheduled__{uuid.uuid4()}"
    registry.finish("clip_rebuild", NORMAL, run_id, status="failed", message="bucket missing")
    row = registry.find_run(NORMAL, run_id)
    assert row["status"] == "failed" and row["result_message"] == "bucket missing"


def test_finish_refuses_non_final_states(registry):
    with pytest.raises(ValueError):
        registry.finish("clip_rebuild", NORMAL, "x", status="running", message="")


def test_history_is_newest_first_and_filters_by_type(registry):
    registry.finish("patchcore_create", PATCHCORE, f"r-{uuid.uuid4()}", status="completed", message="p")
    registry.finish("clip_rebuild", NORMAL, f"r-{uuid.uuid4()}", status="completed", message="c")
    history = registry.history(limit=2)
    assert history[0]["deploy_id"] > history[1]["deploy_id"]
    assert {r["deploy_type"] for r in registry.history(deploy_type="patchcore_create")} == {"patchcore_create"}


def test_active_products_come_from_the_products_table(registry, sql):
    from inspection_refresh.registry import CREATE_PRODUCTS

    sql("DROP TABLE IF EXISTS products")
    sql(CREATE_PRODUCTS)
    sql("INSERT INTO products (product_id, product_code, product_name, is_active) VALUES "
        "(1, 'A1', 'Alpha', 1), (2, 'B2', 'Beta', 0), (3, 'C3', NULL, 1)")
    assert [(p.product_id, p.product_code) for p in registry.active_products()] == [(1, "A1"), (3, "C3")]
    assert registry.products_by_id()[2].product_name == "Beta"
    sql("DROP TABLE products")


def test_unreachable_database_names_the_connection(monkeypatch, mysql_database):
    monkeypatch.setenv("AIRFLOW_CONN_BROKEN_DB", '{"conn_type": "mysql", "host": "127.0.0.1", "port": 1, '
                                                 '"login": "root", "schema": "x"}')
    with pytest.raises(RegistryError, match="database connection 'broken_db'"):
        compose.deployment_registry("broken_db").history()


def test_both_clip_dags_with_one_run_id_keep_a_row_each(registry, sql):
    run_id = f"scheduled__{uuid.uuid4()}"  # both CLIP DAGs run on one schedule: same run id, same deploy_type
    for dag_id, index_type in ((NORMAL, "normal"), (DEFECT, "defect")):
        registry.start("clip_rebuild", dag_id, run_id, details={"index_type": index_type})
    registry.finish("clip_rebuild", NORMAL, run_id, status="completed", message="normal published")
    registry.finish("clip_rebuild", DEFECT, run_id, status="failed", message="defect failed")
    rows = sql("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s "
               "ORDER BY deploy_id", (run_id,))
    assert [(json.loads(r["result_data"])["airflow_dag_id"], json.loads(r["result_data"])["index_type"],
             r["status"], r["result_message"]) for r in rows] == [
        (NORMAL, "normal", "completed", "normal published"), (DEFECT, "defect", "failed", "defect failed")]


def test_concurrent_starts_of_one_run_make_one_row(mysql_database, sql):
    run_id, writers = f"manual__{uuid.uuid4()}", 8
    barrier = threading.Barrier(writers)

    def start() -> int:
        registry = compose.deployment_registry()
        registry.ensure_tables()
        barrier.wait()  # every writer looks for the row at the same moment
        return registry.start("clip_rebuild", NORMAL, run_id)

    with ThreadPoolExecutor(writers) as pool:
        deploy_ids = set(pool.map(lambda _: start(), range(writers)))
    rows = sql("SELECT deploy_id FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
               (run_id,))
    assert len(rows) == 1 and deploy_ids == {rows[0]["deploy_id"]}


@pytest.fixture
def least_privileged_connection(mysql_database, monkeypatch):
    """A schema holding deployment_logs and an account with only SELECT, INSERT, UPDATE on it,
    as Airflow connection ``deploy_db_limited``; both are dropped afterwards."""
    import MySQLdb
    from inspection_refresh.registry import CREATE_DEPLOYMENT_LOGS

    schema, account, password = (f"inspection_lp_{uuid.uuid4().hex[:8]}", f"deploy_{uuid.uuid4().hex[:8]}",
                                 uuid.uuid4().hex)
    admin = MySQLdb.connect(**{k: mysql_database[k] for k in ("host", "port", "user", "password")}, autocommit=True)
    cursor = admin.cursor()
    cursor.execute(f"CREATE DATABASE `{schema}`")
    admin.select_db(schema)
    cursor.execute(CREATE_DEPLOYMENT_LOGS)
    cursor.execute(f"CREATE USER '{account}'@'%%' IDENTIFIED BY %s", (password,))  # %% : any host
    cursor.execute(f"GRANT SELECT, INSERT, UPDATE ON `{schema}`.deployment_logs TO '{account}'@'%'")
    monkeypatch.setenv("AIRFLOW_CONN_DEPLOY_DB_LIMITED", json.dumps({
        "conn_type": "mysql", "host": mysql_database["host"], "port": mysql_database["port"], "login": account,
        "password": password, "schema": schema}))
    yield {"conn_id": "deploy_db_limited", "schema": schema, "admin": cursor}
    cursor.execute(f"DROP USER '{account}'@'%'")
    cursor.execute(f"DROP DATABASE `{schema}`")
    admin.close()


def test_an_account_with_only_select_insert_update_writes_the_history(least_privileged_connection):
    conn_id, schema, admin = (least_privileged_connection[k] for k in ("conn_id", "schema", "admin"))
    run_id = f"manual__{uuid.uuid4()}"
    registry = compose.deployment_registry(conn_id)
    registry.start("patchcore_create", PATCHCORE, run_id, deployed_by="airflow:admin")
    registry.finish("patchcore_create", PATCHCORE, run_id, status="completed", message="2 banks published")
    admin.execute(f"SELECT status, result_message FROM `{schema}`.deployment_logs")
    assert admin.fetchall() == (("completed", "2 banks published"),)

    admin.execute(f"DROP TABLE `{schema}`.deployment_logs")
    with pytest.raises(RegistryError, match=r"may not create it .*Grant CREATE on that schema"):
        compose.deployment_registry(conn_id).start("patchcore_create", PATCHCORE, run_id)


def test_a_long_hangul_message_is_cut_to_the_column_on_a_character_boundary(registry, sql):
    run_id = f"manual__{uuid.uuid4()}"
    message = "배포 실패: " + "이미지를 읽을 수 없습니다. " * 8000  # ~290 KB of UTF-8, 3 bytes per syllable
    registry.finish("clip_rebuild", NORMAL, run_id, status="failed", message=message)
    stored = registry.find_run(NORMAL, run_id)["result_message"]
    assert len(stored.encode("utf-8")) <= MESSAGE_LIMIT_BYTES < len(message.encode("utf-8"))
    assert stored.endswith(CUT_MARKER) and message.startswith(stored[:-len(CUT_MARKER)])
    assert len(stored.encode("utf-8")) > MESSAGE_LIMIT_BYTES - 10  # cut at the limit, not far before it
    # Room for 4 bytes: "ab" and 2 of the 3 bytes of "가", which are dropped rather than split.
    assert fit_message("ab가나다라마", 4 + len(CUT_MARKER.encode())) == "ab" + CUT_MARKER
    assert fit_message("short") == "short"


def test_the_next_run_closes_rows_that_ended_runs_left_running(registry):
    ended, still_running, new = (f"scheduled__{uuid.uuid4()}" for _ in range(3))
    for dag_id, run_id in ((NORMAL, ended), (NORMAL, still_running), (DEFECT, ended)):
        registry.start("clip_rebuild", dag_id, run_id)  # then the database went away: never closed
    airflow_states = {(NORMAL, ended): "failed", (DEFECT, ended): "success"}

    closed = registry.close_abandoned_runs(NORMAL, new, lambda dag_id, run_id: airflow_states.get((dag_id, run_id)))
    row = registry.find_run(NORMAL, ended)
    assert closed == [row["deploy_id"]] and row["status"] == "failed" and row["completed_at"]
    assert row["result_message"] == (f"closed by run {new}: Airflow run {ended} ended failed "
                                     "without closing its deployment record")
    assert registry.find_run(NORMAL, still_running)["status"] == "running"  # Airflow: not finished
    assert registry.find_run(DEFECT, ended)["status"] == "running"  # another DAG's row


def test_failure_callback_closes_an_open_row_and_keeps_a_closed_one(registry):
    from inspection_refresh.operators import close_deployment_on_failure

    dag = SimpleNamespace(dag_id=NORMAL, dagrun_timeout=timedelta(hours=3))
    timed_out, register_failed, completed = (f"scheduled__{uuid.uuid4()}" for _ in range(3))
    for run_id in (timed_out, register_failed, completed):
        registry.start("clip_rebuild", NORMAL, run_id)
    registry.finish("clip_rebuild", NORMAL, completed, status="completed", message="published")

    close_deployment_on_failure({"dag": dag, "run_id": timed_out, "reason": "timed_out"})
    close_deployment_on_failure({"dag": dag, "run_id": register_failed, "reason": "task_failure",
                                 "ti": SimpleNamespace(task_id="register")})
    close_deployment_on_failure({"dag": dag, "run_id": completed, "reason": "task_failure"})
    rows = {run_id: registry.find_run(NORMAL, run_id) for run_id in (timed_out, register_failed, completed)}
    assert rows[timed_out]["status"] == "failed" and rows[timed_out]["completed_at"]
    assert f"Airflow run {timed_out} failed before recording its outcome: the run exceeded its dagrun_timeout " \
           "(3:00:00)" in rows[timed_out]["result_message"]
    assert "task register failed" in rows[register_failed]["result_message"]
    assert (rows[completed]["status"], rows[completed]["result_message"]) == ("completed", "published")


def test_failure_callback_never_raises_when_the_database_is_down(monkeypatch, mysql_database, caplog):
    from inspection_refresh.operators import close_deployment_on_failure

    monkeypatch.setenv("INSPECTION_DB_CONN_ID", "broken_db")
    monkeypatch.setenv("AIRFLOW_CONN_BROKEN_DB", '{"conn_type": "mysql", "host": "127.0.0.1", "port": 1, '
                                                 '"login": "root", "schema": "x"}')
    close_deployment_on_failure({"dag": SimpleNamespace(dag_id=NORMAL), "run_id": "r", "reason": "timed_out"})
    assert "the DAG's next run closes it" in caplog.text


def test_listener_closes_rows_of_runs_an_operator_ended_and_leaves_the_rest(registry):
    """The plugin's listener: runs marked failed/success through the UI or API; never the scheduler's own."""
    from inspection_refresh import listeners

    marked_failed, marked_success, task_failure, other_team = (f"manual__{uuid.uuid4()}" for _ in range(4))
    for run_id in (marked_failed, marked_success, task_failure, other_team):
        registry.start("clip_rebuild", NORMAL, run_id)
    ours, theirs = SimpleNamespace(tags={"clip", "deployment"}), SimpleNamespace(tags={"etl"})

    def dag_run(run_id: str, dag=ours) -> SimpleNamespace:
        return SimpleNamespace(dag_id=NORMAL, run_id=run_id, dag=dag)

    listeners.on_dag_run_failed(dag_run(marked_failed), "Dag Run's state was manually set to `failed`.")
    listeners.on_dag_run_success(dag_run(marked_success), "Dag Run's state was manually set to `success`.")
    listeners.on_dag_run_failed(dag_run(task_failure), "task_failure")  # the DAG's failure callback's job
    listeners.on_dag_run_failed(dag_run(other_team, theirs), "Dag Run's state was manually set to `failed`.")
    rows = {run_id: registry.find_run(NORMAL, run_id) for run_id in (marked_failed, marked_success, task_failure,
                                                                       other_team)}
    assert rows[marked_failed]["status"] == rows[marked_success]["status"] == "failed"
    assert f"Airflow run {marked_failed} was marked failed through the Airflow UI or API" \
        in rows[marked_failed]["result_message"]
    assert f"Airflow run {marked_success} was marked success" in rows[marked_success]["result_message"]
    assert rows[task_failure]["status"] == rows[other_team]["status"] == "running"


def test_publishing_is_not_refused_outside_an_airflow_task():
    from inspection_refresh.runtime import refuse_publishing_if_run_ended

    refuse_publishing_if_run_ended(NORMAL, "manual__cli", "normal index version X")  # no error: nothing to ask


def test_a_named_lock_has_one_holder_across_connections_and_long_names_fit(registry):
    name = "inspection-refresh s3://a-bucket/deployments/patchcore/" + "P" * 80 + "/"
    assert len(lock_name_for(name)) == 64 and lock_name_for(name) != lock_name_for(name + "x")
    held, waited = threading.Event(), []
    with registry.named_lock(name):
        def other_host() -> None:
            try:
                with registry.named_lock(name, wait_seconds=0.2, purpose="clip:normal"):
                    waited.append("granted")
            except RegistryError as exc:
                waited.append(str(exc))
            held.set()

        threading.Thread(target=other_host).start()
        assert held.wait(10)
    assert waited[0].startswith("clip:normal stayed locked by another host for 0.2s"), waited
    with registry.named_lock(name, wait_seconds=1):  # released with its holder
        pass
    with pytest.raises(KeyError), registry.named_lock(name):  # the block's own error, not a connection error
        raise KeyError("mine")
    with registry.named_lock(name, wait_seconds=1):
        pass
