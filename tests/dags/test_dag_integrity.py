"""Every DAG file parses, follows the project's conventions and stays light at parse time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPECTED_DAGS = {"clip_index_normal", "clip_index_defect", "patchcore_memory_bank"}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors_and_all_dags_present(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == EXPECTED_DAGS


def test_conventions(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 200, f"{dag_id} has no real doc_md"
        assert dag.max_active_runs == 1, f"{dag_id} must queue a second trigger instead of racing"
        assert dag.catchup is False
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", f"{dag_id}.{task.task_id} has no owner"
            assert task.execution_timeout is not None, f"{dag_id}.{task.task_id} has no execution timeout"
        retried = [t.task_id for t in dag.tasks if t.retries >= 1]
        assert retried, f"{dag_id} retries nothing"
        for name, param in dag.params.items():
            schema = param.schema
            assert schema.get("title"), f"{dag_id} param {name} has no title for the trigger form"


def test_clip_dags_come_from_one_factory(dagbag):
    normal, defect = dagbag.dags["clip_index_normal"], dagbag.dags["clip_index_defect"]
    assert [t.task_id for t in normal.tasks] == ["download", "embed", "index_save", "register"]
    assert [t.task_id for t in defect.tasks] == [t.task_id for t in normal.tasks]
    assert normal.params["prefix"] == "images/normal/" and defect.params["prefix"] == "images/defect/"
    assert normal.get_task("download").retries == 3 and normal.get_task("download").retry_exponential_backoff


def test_patchcore_builds_through_a_pooled_bash_operator(dagbag):
    dag = dagbag.dags["patchcore_memory_bank"]
    build = dag.get_task("product.build")
    assert type(build).__name__ == "BashOperator"
    assert build.pool == "patchcore_build"
    assert not build.bash_command.strip().endswith(".sh")  # would be read as a Jinja template file


def test_parsing_dag_files_does_not_import_heavy_libraries():
    code = (
        "import sys, json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        "print(json.dumps({'dags': sorted(bag.dags), 'heavy': sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'open_clip', 'faiss', 'torchvision', 'timm'))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ.copy())
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["dags"]) == EXPECTED_DAGS
    assert result["heavy"] == []
