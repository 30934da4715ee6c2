"""deployment_rollback and pins end to end: the DAG and ``inspection-publish`` roll a CLIP index back,
scheduled runs leave the pinned index alone, a manual run publishes over it and removes the pin.

Real parts as in test_clip_dag: the S3 server, MariaDB, ``dag.test()`` runs, open_clip and FAISS.
Scheduled runs are driven through the task function (``dag.test()`` only makes manual runs).
"""

from __future__ import annotations

import os
import re

import pytest
from inspection_refresh.publish import Publisher

from tests.integration.dag_runner import run_dag
from tests.integration.test_clip_dag import (  # noqa: F401
    deployment_row,
    env,
    jpeg,
    live_version,
    seed_normal,
)

pytestmark = pytest.mark.slow


def scheduled_download(run_id: str):
    """The CLIP download task as a scheduled run calls it."""
    from inspection_refresh.tasks import clip_index as pipeline

    return pipeline.download(pipeline.ClipRun(index_type="normal", run_id=run_id, prefix="images/normal/",
                                              pretrained=os.environ["INSPECTION_CLIP_PRETRAINED"], scheduled=True))


def publish_two_versions(env) -> tuple[str, str]:
    """(older, live): two CLIP normal index versions of different images."""
    seed_normal(env["put"], per_product=1)
    assert run_dag("clip_index_normal").state == "success"
    older = live_version(env["root"], "normal")
    env["put"]("images/normal/1/BRKT01_OK_500.jpg", jpeg(0, 500))
    assert run_dag("clip_index_normal").state == "success"
    return older, live_version(env["root"], "normal")


def test_rollback_dag_pins_until_a_manual_run_publishes(env):
    from inspection_refresh.tasks.common import NothingToDo

    older, newer = publish_two_versions(env)
    result = run_dag("deployment_rollback", {"artefact": "clip:normal"})
    assert result.state == "success", result.task_states
    assert live_version(env["root"], "normal") == older
    row = deployment_row(env["sql"], result.run_id)
    assert row["deploy_type"] == "rollback" and row["status"] == "completed" and row["completed_at"]
    assert row["result_message"].startswith(f"clip:normal rolled back from {newer} to {older} by airflow")
    data = row["result_data"]
    assert (data["artefact"], data["from_version"], data["to_version"]) == ("clip:normal", newer, older)
    pin = Publisher(env["root"]).pinned("normal")
    assert pin["version"] == older and pin["run_id"] == result.run_id and pin == data["pin"]

    with pytest.raises(NothingToDo, match=f"pinned to version {older} by airflow.*artefact=clip:normal and unpin"):
        scheduled_download("scheduled__while_pinned")
    assert live_version(env["root"], "normal") == older

    manual = run_dag("clip_index_normal")  # storage holds the newer images: a new version, unpinned
    assert manual.state == "success", manual.task_states
    assert live_version(env["root"], "normal") not in (older, newer)
    assert Publisher(env["root"]).pinned("normal") is None


def test_cli_rollback_pins_and_the_dag_unpins_or_fails_clearly(env, capsys):
    from inspection_refresh.cli import main
    from inspection_refresh.tasks.common import NothingToDo

    older, newer = publish_two_versions(env)
    root = str(env["root"])
    assert main(["rollback", "--root", root, "--name", "normal"]) == 0
    assert live_version(env["root"], "normal") == older
    with pytest.raises(NothingToDo, match=f"pinned to version {older} by cli"):
        scheduled_download("scheduled__cli_pinned")
    assert main(["list", "--root", root, "--name", "normal"]) == 0
    assert f"normal is pinned to version {older}" in capsys.readouterr().out

    unpinned = run_dag("deployment_rollback", {"artefact": "clip:normal", "unpin": True})
    assert unpinned.state == "success", unpinned.task_states
    row = deployment_row(env["sql"], unpinned.run_id)
    assert row["status"] == "completed" and row["result_data"]["removed_pin"]["version"] == older
    assert re.match(f"clip:normal unpinned by airflow(:\\w+)?: version {older} stays live", row["result_message"])
    assert Publisher(env["root"]).pinned("normal") is None and live_version(env["root"], "normal") == older

    for conf, reason in (({"artefact": "clip:bogus"}, "unknown CLIP index 'clip:bogus': use clip:normal or "),
                         ({"artefact": "NOPE01"}, "nothing of 'NOPE01' is published"),
                         ({"artefact": "clip:normal", "version": "20990101T000000000000Z"},
                          f"is not kept; kept versions: {older}, {newer}. Live version: {older}.")):
        failed = run_dag("deployment_rollback", conf)
        assert failed.state == "failed" and failed.task_states == {"rollback": "failed", "register": "failed"}
        row = deployment_row(env["sql"], failed.run_id)
        assert row["status"] == "failed" and reason in row["result_message"], row["result_message"]
    assert live_version(env["root"], "normal") == older and Publisher(env["root"]).pinned("normal") is None
