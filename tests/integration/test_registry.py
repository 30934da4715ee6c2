"""deployment_logs and products on a real MariaDB through the Airflow MySQL connection."""

from __future__ import annotations

import uuid

import pytest

from inspection_refresh.registry import DeploymentRegistry, RegistryError


@pytest.fixture
def registry(mysql_database):
    return DeploymentRegistry()


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
    first = registry.start("clip_rebuild", run_id, deployed_by="airflow:admin", details={"index_type": "normal"})
    again = registry.start("clip_rebuild", run_id, details={"index_type": "normal"})  # a retried task
    assert first == again
    assert sql("SELECT status FROM deployment_logs WHERE deploy_id = %s", (first,)) == [{"status": "running"}]
    registry.finish("clip_rebuild", run_id, status="completed", message="done",
                    result_data={"num_images": 3, "embedding_dim": 512})
    rows = sql("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s", (run_id,))
    assert len(rows) == 1
    row = registry.find_run("clip_rebuild", run_id)
    assert row["status"] == "completed" and row["completed_at"] and row["deployed_by"] == "airflow:admin"
    assert row["result_data"] == {"airflow_run_id": run_id, "index_type": "normal", "num_images": 3,
                                  "embedding_dim": 512}


def test_finish_without_start_still_records_the_failure(registry):
    run_id = f"scheduled__{uuid.uuid4()}"
    registry.finish("clip_rebuild", run_id, status="failed", message="bucket missing")
    row = registry.find_run("clip_rebuild", run_id)
    assert row["status"] == "failed" and row["result_message"] == "bucket missing"


def test_finish_refuses_non_final_states(registry):
    with pytest.raises(ValueError):
        registry.finish("clip_rebuild", "x", status="running", message="")


def test_history_is_newest_first_and_filters_by_type(registry):
    registry.finish("patchcore_create", f"r-{uuid.uuid4()}", status="completed", message="p")
    registry.finish("clip_rebuild", f"r-{uuid.uuid4()}", status="completed", message="c")
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
        DeploymentRegistry("broken_db").history()
