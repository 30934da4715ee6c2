"""Run identity, error classification and work-file housekeeping shared by the DAG tasks."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
from inspection_refresh.runstore import run_work_dir, safe_run_id
from inspection_refresh.runtime import (
    PermanentError,
    fail_permanent_errors,
    is_permanent,
    run_identity,
)
from inspection_refresh.storage import StorageError
from inspection_refresh.tasks.common import prune_run_work_dirs


@pytest.mark.parametrize("run_type, user, scheduled, deployed_by", [
    ("scheduled", None, True, "airflow-scheduler"),
    ("DagRunType.SCHEDULED", None, True, "airflow-scheduler"),
    ("manual", "admin", False, "airflow:admin"),
    ("asset_triggered", None, False, "airflow"),
])
def test_run_identity(run_type, user, scheduled, deployed_by):
    context = {"run_id": "r1", "dag_run": SimpleNamespace(run_type=run_type, triggering_user_name=user)}
    assert run_identity(context) == ("r1", scheduled, deployed_by)


def test_only_errors_a_retry_cannot_fix_are_permanent():
    assert is_permanent(StorageError("bucket missing"))
    assert not is_permanent(StorageError("connection reset", transient=True))
    assert is_permanent(PermanentError("no products")) and is_permanent(ValueError("nothing readable"))
    assert not is_permanent(OSError("disk hiccup")) and not is_permanent(RuntimeError("?"))


def test_permanent_errors_fail_without_retry():
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="no products .*not retried") as failed:
        with fail_permanent_errors():
            raise PermanentError("no products")
    assert failed.value.__cause__ is None and failed.value.__suppress_context__  # one line, no chained traceback
    with pytest.raises(ConnectionError):
        with fail_permanent_errors():
            raise ConnectionError("retry me")


def test_run_ids_become_safe_directory_names(tmp_path):
    assert safe_run_id("manual__2026-11-26T13:00:00+00:00") == "manual__2026-11-26T13_00_00_00_00"
    assert run_work_dir(tmp_path, "clip", "../../etc").parent == tmp_path / "clip" / "runs"


def test_old_work_dirs_of_failed_runs_are_pruned(tmp_path):
    old, recent = run_work_dir(tmp_path, "clip", "old"), run_work_dir(tmp_path, "clip", "recent")
    month_ago = time.time() - 30 * 86400
    os.utime(old, (month_ago, month_ago))
    assert prune_run_work_dirs(tmp_path, "clip") == [old]
    assert not old.exists() and recent.exists()


def test_build_scripts_come_from_the_allow_list(tmp_path, monkeypatch):
    from inspection_refresh.runtime import PermanentError
    from inspection_refresh.tasks import patchcore as pipeline

    extra = tmp_path / "site_build.sh"
    extra.write_text("#!/usr/bin/env bash\n")
    monkeypatch.setenv("INSPECTION_PATCHCORE_SCRIPTS", f"{extra}:{tmp_path / 'gone.sh'}")
    assert pipeline.allowed_scripts(pipeline.get_settings()) == [
        str(pipeline.BUNDLED_SCRIPT), str(extra), str(tmp_path / "gone.sh")]
    assert pipeline.PatchcoreRun(run_id="r").script_path == pipeline.BUNDLED_SCRIPT
    assert pipeline.PatchcoreRun(run_id="r", script=str(extra)).script_path == extra
    with pytest.raises(PermanentError, match="not allowed on this worker.*INSPECTION_PATCHCORE_SCRIPTS"):
        pipeline.PatchcoreRun(run_id="r", script="/bin/sh").script_path
    with pytest.raises(PermanentError, match="gone.sh does not exist"):
        pipeline.PatchcoreRun(run_id="r", script=str(tmp_path / "gone.sh")).script_path


def test_the_build_script_environment_has_no_connection_secrets(monkeypatch):
    from inspection_refresh.tasks.patchcore import script_environment

    monkeypatch.setenv("AIRFLOW_CONN_DEPLOY_DB", "mysql://root:secret@db/x")
    monkeypatch.setenv("NCP_SECRET_KEY", "secret")
    env = script_environment({"PRODUCT_CODE": "P1"})
    assert env["PRODUCT_CODE"] == "P1" and env["PATH"] == __import__("os").environ["PATH"]
    assert "AIRFLOW_CONN_DEPLOY_DB" not in env and "NCP_SECRET_KEY" not in env


def test_a_failed_stage_says_what_the_operator_must_do_without_a_class_name(tmp_path):
    from inspection_refresh.tasks.stages import failure_message, read_stages, record_stage

    assert failure_message(PermanentError("unknown product code NOPE99")) == "unknown product code NOPE99"
    assert failure_message(OSError("disk full")) == "OSError: disk full"  # a fault: its kind says what broke
    with pytest.raises(PermanentError), record_stage(tmp_path, "list_products"):
        raise PermanentError("unknown product code NOPE99")
    assert read_stages(tmp_path, ["list_products"])["list_products"]["message"] == "unknown product code NOPE99"


def test_an_unknown_product_code_is_named_with_the_known_ones():
    from inspection_refresh.registry import Product
    from inspection_refresh.tasks.patchcore.prepare import unknown_products_message

    products = [Product(11, "TEX01", "Textured panel"), Product(12, "EMPTY02", "Nothing uploaded")]
    assert unknown_products_message(["NOPE99"], products, "products table") == (
        "unknown or inactive product code NOPE99. Active products (code and id, from the products table): "
        "TEX01 (11), EMPTY02 (12). Trigger again with some of these, or with products empty for all")
    assert unknown_products_message(["A1", "B2"], [], "storage folders").startswith(
        "unknown or inactive product codes A1, B2. Active products (code and id, from the storage folders): none.")


def test_a_run_note_is_left_as_xcom_and_shortened_to_what_airflow_keeps():
    from inspection_refresh.runtime import RUN_NOTE_KEY, RUN_NOTE_MAX, leave_run_note

    pushed = {}
    ti = SimpleNamespace(xcom_push=lambda key, value: pushed.update({key: value}))
    assert leave_run_note({"ti": ti}, "1 product unchanged, nothing published") == pushed[RUN_NOTE_KEY]
    long = leave_run_note({"ti": ti}, "x" * 5000)
    assert len(long) == RUN_NOTE_MAX and long.endswith("…") and pushed[RUN_NOTE_KEY] == long
    assert leave_run_note({}, "no task instance: logged, never raised") == "no task instance: logged, never raised"
