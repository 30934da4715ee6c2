"""patchcore_memory_bank end to end through ``dag.test()``: one product publishes, one fails.

Real parts: the NCP-like S3 server, MariaDB (products + deployment_logs), a migrated
Airflow DB, the BashOperator running build_patchcore.sh, torchvision and FAISS.
The backbone has random-init weights (ImageNet weights cannot be downloaded here).
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from inspection_refresh import compose

from tests.integration.dag_runner import asset_events, patchcore_dag_env, run_dag
from tests.samples import sample_jpeg

pytestmark = pytest.mark.slow


@pytest.fixture
def env(s3_server, mysql_database, airflow_db, sql, tmp_path, monkeypatch):
    """TEX01 with 8 normal and 3 defect images; EMPTY02 with a folder marker only; OLD03 inactive."""
    products = ("(11, 'TEX01', 'Textured panel', 1), (12, 'EMPTY02', 'Nothing uploaded', 1), "
                "(13, 'OLD03', 'Retired', 0)")
    with patchcore_dag_env("pc", products, sql, tmp_path, monkeypatch) as env:
        env["put"]("images/normal/12/", b"")  # a folder marker and nothing else
        yield env


def run_note(dag_id: str, run_id: str) -> str | None:
    """The note on the run's page in the UI."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one().note


def test_an_unknown_product_code_fails_list_products_in_one_line_and_nothing_is_approved(env):
    result = run_dag("patchcore_memory_bank", {"products": ["TEX01", "NOPE99"]})
    assert result.state == "failed"
    assert result.task_states["list_products"] == "failed"
    assert result.task_states["approve"] == "skipped"  # nothing to approve: not a green success
    row = env["sql"]("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
                     (result.run_id,))[0]
    message = row["result_message"]
    assert row["status"] == "failed" and "\n" not in message and "Traceback" not in message
    assert message.startswith("no products were built: unknown or inactive product code NOPE99. Active products "
                              "(code and id, from the products table): TEX01 (11), EMPTY02 (12)"), message
    assert "PermanentError" not in message and "RANDOM" not in message  # nothing was built with any weights
    assert run_note("patchcore_memory_bank", result.run_id) == message


def test_one_product_fails_the_other_publishes_and_history_says_so(env):
    from inspection_refresh.publish import Publisher

    # EMPTY02 had a working bank before this run: it must stay live.
    publisher = Publisher(env["root"])
    staging = publisher.stage("EMPTY02")
    (staging / "memory_bank.pt").write_bytes(b"previous bank")
    publisher.publish("EMPTY02", staging, "20260101T000000000000Z")

    result = run_dag("patchcore_memory_bank", {"shorter": 128, "coreset": 0.1})
    assert result.state == "failed"
    states = result.task_states
    assert states["list_products"] == "success"
    assert sorted(k for k in states if k.startswith("product.prepare")) == ["product.prepare[0]", "product.prepare[1]"]
    assert states["product.publish[0]"] == "success" and states["product.prepare[1]"] == "failed"
    assert states["register"] == "failed"
    assert result.labels["product.prepare[0]"] == "TEX01" and result.labels["product.prepare[1]"] == "EMPTY02"
    assert result.labels["product.build[0]"] == "TEX01" and result.labels["product.publish[0]"] == "TEX01"

    bank = env["root"] / "TEX01"
    import torch

    memory_bank = torch.load(bank / "memory_bank.pt")
    config = json.loads((bank / "bank_config.json").read_text())
    tau = json.loads((bank / "tau.json").read_text())
    assert memory_bank.dtype == torch.float32 and memory_bank.ndim == 2
    assert memory_bank.shape[1] == config["feature_dim"] == 512 + 1024
    assert config["layers"] == ["layer2", "layer3"] and config["shorter"] == 128 and config["stride"] == 2
    assert 0 < tau["image"] and 0 < tau["pixel"]
    assert len(list((bank / "ok").glob("*.jpg"))) == 8
    assert (bank / "score_histogram.png").is_file()
    assert (env["root"] / "EMPTY02" / "memory_bank.pt").read_bytes() == b"previous bank"
    assert sorted(os.listdir(env["root"])) == ["EMPTY02", "TEX01"]  # the service takes every entry for a product

    rows = env["sql"]("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
                      (result.run_id,))
    assert len(rows) == 1
    row = rows[0]
    data = json.loads(row["result_data"])
    assert row["deploy_type"] == "patchcore_create" and row["status"] == "failed"
    assert "EMPTY02 at download" in row["result_message"] and "no normal images" in row["result_message"]
    assert "Published: TEX01" in row["result_message"]
    assert set(data["products"]) == {"TEX01", "EMPTY02"}  # OLD03 is inactive
    tex = data["products"]["TEX01"]
    assert tex["status"] == "published" and tex["num_images"] == 8
    assert tex["bank_size"] == memory_bank.shape[0] and tex["feature_dim"] == 1536
    assert tex["tau"] == tau and tex["auroc"] is not None and tex["seconds"] > 0
    assert data["products"]["EMPTY02"]["status"] == "failed"

    events = asset_events("patchcore_bank_TEX01")
    assert events and events[-1]["bank_size"] == memory_bank.shape[0]


def test_a_failing_build_script_keeps_the_old_bank_and_names_the_error(env, tmp_path, monkeypatch):
    from inspection_refresh.config import default_releases_dir

    script = tmp_path / "broken_build.sh"
    seen_env = tmp_path / "script-env.txt"
    script.write_text(f'#!/usr/bin/env bash\nenv > {seen_env}\necho "building $PRODUCT_CODE"\n'
                      'echo "ERROR: GPU out of memory while building $PRODUCT_CODE" >&2\nexit 3\n')
    monkeypatch.setenv("INSPECTION_PATCHCORE_SCRIPTS", str(script))  # operators pick from the allow-list
    monkeypatch.setenv("AIRFLOW_CONN_SOME_SECRET", "mysql://user:hunter2@db/x")
    result = run_dag("patchcore_memory_bank", {"products": ["TEX01"], "script": str(script), "shorter": 128})
    assert result.state == "failed"
    names = {line.split("=", 1)[0] for line in seen_env.read_text().splitlines() if "=" in line}
    assert {"PRODUCT_CODE", "OK_DIR", "OUT_DIR", "PATCHCORE_LAYERS", "PYTHON", "PATH"} <= names
    # This worker's per-image feature cache (under INSPECTION_CACHE_ROOT, kept between runs) and its bound.
    assert f"PATCHCORE_FEATURE_CACHE={os.environ['INSPECTION_CACHE_ROOT']}/patchcore_features" in seen_env.read_text()
    assert "PATCHCORE_FEATURE_CACHE_GB=4" in seen_env.read_text().splitlines()
    assert not [name for name in names if name.startswith("AIRFLOW_CONN")] and "hunter2" not in seen_env.read_text()
    assert result.task_states["product.build[0]"] == "failed"
    row = env["sql"]("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
                     (result.run_id,))[0]
    assert "TEX01 at build: ERROR: GPU out of memory while building TEX01" in row["result_message"]
    assert not (env["root"] / "TEX01").exists()
    assert not list((default_releases_dir(env["root"]) / "TEX01").glob(".staging-*"))


def test_a_cleared_register_of_a_completed_run_keeps_the_row(env):
    from inspection_refresh.tasks import patchcore as pipeline

    run = pipeline.PatchcoreRun(run_id=f"manual__{uuid.uuid4()}")
    compose.deployment_registry().finish(pipeline.DEPLOY_TYPE, run.dag_id, run.run_id, status="completed",
                                message="1 PatchCore banks published: TEX01", result_data={"products": {}})
    outcome = pipeline.register(run)  # its work files were removed when the run completed
    assert (outcome["status"], outcome["message"]) == ("completed", "1 PatchCore banks published: TEX01")
    rows = env["sql"]("SELECT status FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
                      (run.run_id,))
    assert rows == [{"status": "completed"}]


def test_prepare_fails_for_a_retry_naming_an_image_that_never_downloads(env, s3_server, tmp_path):
    from inspection_refresh.storage import StorageError
    from inspection_refresh.tasks import patchcore as pipeline

    run = pipeline.PatchcoreRun(run_id="manual__prepare")
    tex01 = {"product_code": "TEX01", "product_id": 11}
    ok_dir = tmp_path / "cache" / "patchcore" / "TEX01" / "ok"
    pipeline.prepare_product(run, tex01)
    assert (ok_dir / "TEX01_OK_003.jpg").is_file()

    with s3_server.faults(always_fail=["TEX01_OK_003"]):
        # A new version of the image, which then cannot be downloaded.
        compose.object_storage().client.put_object(Bucket=os.environ["INSPECTION_BUCKET"],
                                          Key="images/normal/11/TEX01_OK_003.jpg", Body=sample_jpeg(0, 303))
        with pytest.raises(StorageError, match="TEX01_OK_003") as info:
            pipeline.prepare_product(run, tex01)
    assert info.value.transient  # Airflow retries the task
    assert not (ok_dir / "TEX01_OK_003.jpg").exists()  # the build never sees the old version as current
    assert len(list(ok_dir.glob("*.jpg"))) == 7


def test_an_unchanged_bank_is_not_rebuilt_and_a_pinned_product_waits_for_a_manual_run(env, caplog):
    from inspection_refresh.publish import Publisher
    from inspection_refresh.tasks import patchcore as pipeline

    params = {"products": ["TEX01"], "shorter": 128}
    first = run_dag("patchcore_memory_bank", params)
    assert first.state == "success"
    publisher = Publisher(env["root"])
    version = publisher.current("TEX01")
    assert run_note("patchcore_memory_bank", first.run_id).startswith("1 PatchCore bank published: TEX01 (")

    caplog.clear()
    again = run_dag("patchcore_memory_bank", params)
    assert again.state == "success", again.task_states
    assert [again.task_states[f"product.{t}[0]"] for t in ("prepare", "build")] == ["skipped"] * 2
    assert again.task_states["approve"] == "skipped"  # nothing was built, so nothing to approve
    # publish is skipped before it is even mapped (its approve upstream skipped)
    assert again.task_states.get("product.publish[0]", again.task_states.get("product.publish")) == "skipped", \
        again.task_states
    # prepare's log says why it skips; the run's note says what the run did.
    assert (f"TEX01: unchanged since version {version} (same 8 normal images and settings); nothing to build"
            in caplog.messages), caplog.messages
    assert run_note("patchcore_memory_bank", again.run_id) == (
        f"1 product unchanged, nothing published; TEX01 unchanged, version {version} stays live")
    row = env["sql"]("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
                     (again.run_id,))[0]
    assert row["status"] == "completed" and f"TEX01 unchanged, version {version} stays live" in row["result_message"]
    assert json.loads(row["result_data"])["products"]["TEX01"]["status"] == "unchanged"
    assert publisher.versions("TEX01") == [version]

    publisher.pin("TEX01", version, "airflow:admin")
    scheduled = pipeline.PatchcoreRun(run_id=f"scheduled__{uuid.uuid4()}", scheduled=True)
    assert [p["product_code"] for p in pipeline.list_products(scheduled)] == ["EMPTY02"]  # TEX01 left out
    outcome = pipeline.register(scheduled)  # (EMPTY02 never ran here)
    assert f"Left out (pinned): TEX01 pinned to version {version} by airflow:admin" in outcome["message"]

    changed = run_dag("patchcore_memory_bank", {**params, "shorter": 96})  # manual, another setting
    assert changed.state == "success", changed.task_states
    assert publisher.current("TEX01") != version and publisher.pinned("TEX01") is None


def test_a_bad_and_a_duplicate_product_code_fail_only_those_products(env):
    env["sql"]("INSERT INTO products (product_id, product_code, product_name, is_active) VALUES "
               "(14, 'BAD 04', 'Space in its code', 1), (15, 'DUP05', 'First', 1), (16, 'DUP05', 'Second', 1)")
    result = run_dag("patchcore_memory_bank", {"products": ["TEX01", "14", "15", "16"], "shorter": 96})

    assert result.state == "failed"
    labels = {result.labels[f"product.prepare[{i}]"]: result.task_states[f"product.prepare[{i}]"] for i in range(4)}
    assert labels == {"TEX01": "success", "BAD 04": "failed", "DUP05": "failed"}  # both DUP05 prepares failed
    assert sum(state == "failed" for key, state in result.task_states.items() if key.startswith("product.prepare")) == 3
    assert (env["root"] / "TEX01" / "memory_bank.pt").is_file()  # the good product published
    assert sorted(os.listdir(env["root"])) == ["TEX01"]
    row = env["sql"]("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
                     (result.run_id,))[0]
    assert row["status"] == "failed" and "Published: TEX01" in row["result_message"]
    assert "product code 'BAD 04' (product_id 14) cannot name a directory" in row["result_message"]
    assert "product code 'DUP05' is used by products [15, 16]" in row["result_message"]


def test_with_the_storage_run_store_the_bank_travels_through_object_storage(env, tmp_path, monkeypatch):
    """INSPECTION_RUN_STORE=storage: prepare hands over inventories, build fetches them and stores the bank,
    publish stages it from the store; a failed build's log still names the error; completed runs leave nothing."""
    import torch
    from inspection_refresh.publish import Publisher

    monkeypatch.setenv("INSPECTION_RUN_STORE", "storage")
    result = run_dag("patchcore_memory_bank", {"products": ["TEX01"], "shorter": 96})
    assert result.state == "success", result.task_states
    bank = env["root"] / "TEX01"
    memory_bank = torch.load(bank / "memory_bank.pt")
    assert json.loads((bank / "bank_config.json").read_text())["shorter"] == 96
    assert len(list((bank / "ok").glob("*.jpg"))) == 8 and (bank / "tau.json").is_file()
    row = env["sql"]("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
                     (result.run_id,))[0]
    tex = json.loads(row["result_data"])["products"]["TEX01"]
    assert row["status"] == "completed" and tex["bank_size"] == memory_bank.shape[0] and tex["num_images"] == 8
    storage = compose.object_storage()
    assert not list(storage.list_objects("airflow-runs/patchcore/", include_folders=True))  # removed at the end
    cache = tmp_path / "cache" / "patchcore"
    assert not list(cache.glob("runs/*")) and not list(cache.glob("builds/*/*"))  # no local hand-over, no scratch

    script = tmp_path / "broken_build.sh"
    script.write_text('#!/usr/bin/env bash\necho "ERROR: GPU out of memory while building $PRODUCT_CODE" >&2\nexit 3\n')
    monkeypatch.setenv("INSPECTION_PATCHCORE_SCRIPTS", str(script))
    failed = run_dag("patchcore_memory_bank", {"products": ["TEX01"], "script": str(script), "shorter": 96})
    assert failed.state == "failed" and failed.task_states["product.build[0]"] == "failed"
    row = env["sql"]("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
                     (failed.run_id,))[0]
    assert "TEX01 at build: ERROR: GPU out of memory while building TEX01" in row["result_message"]
    assert Publisher(env["root"]).current("TEX01") == bank.resolve().name  # the live bank stays
    assert list(storage.list_objects("airflow-runs/patchcore/"))  # a failed run's files wait for the sweep
