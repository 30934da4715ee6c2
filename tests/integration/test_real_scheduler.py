"""The live index and ``deployment_logs`` stay true under a REAL Airflow when a task's process is
killed, and when an operator marks a run failed.

The other DAG tests run ``dag.test()`` in the test process. Here Airflow runs as in production:
``airflow api-server``, ``airflow scheduler`` (LocalExecutor, parallelism 2) and ``airflow
dag-processor`` as separate processes on a SQLite metadata DB in a temporary AIRFLOW_HOME, with this
repository's dags/ and plugins/, the same ``AIRFLOW_CONN_*`` connections as the other tests, and
runs triggered and marked failed through the REST API, as the UI does. The Task SDK supervisor
(one per task instance, in a LocalExecutor worker) forks a child that runs the task and titles
itself ``airflow worker -- <task instance id>``: that child is what a crash or the OOM killer
takes, and what these tests ``kill -9``.

Starting and stopping the processes, and the REST API calls, are the shared harness's
(:class:`~tests.integration.airflow_processes.AirflowProcesses`).

The whole module takes about 2 minutes on the 2-core development machine (1m50s-2m30s measured):
50-70 s to migrate and start Airflow and publish a first version, then 10-25 s per scenario (5 DAG
runs in all).
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from inspection_refresh import compose

from tests.conftest import _free_port
from tests.integration.airflow_processes import (
    RUN_TIMEOUT_S,
    AirflowProcesses,
    has_ended,
    wait_until,
)
from tests.samples import sample_jpeg

pytestmark = [pytest.mark.slow, pytest.mark.scheduler]

DAG_ID = "clip_index_normal"
INDEX_TYPE = "normal"
POOL_DESCRIPTION = "Object-storage downloads"


def has_loaded_torch(pid: int) -> bool:
    """True once the task imported torch: ``embed`` imports it in its body, not at DAG parse."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@dataclass
class Deployment:
    """The module's bucket and published index, as the Airflow processes see them."""

    airflow: AirflowProcesses
    storage: Any
    index_root: Path

    @property
    def releases(self) -> Path:
        return self.index_root.with_name(self.index_root.name + ".releases") / INDEX_TYPE

    def live_version(self) -> str | None:
        """The live version, checked whole: the manifest behind the link names the same version."""
        link = self.index_root / INDEX_TYPE
        if not link.is_symlink():
            return None
        version = Path(os.readlink(link)).name
        assert json.loads((link / "manifest.json").read_text())["version"] == version
        return version

    def staging_dirs(self) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(self.releases) if entry.name.startswith(".staging-")]
        except FileNotFoundError:
            return []

    def add_image(self, seed: int) -> None:
        """One more image, so the next run really rebuilds."""
        self.storage.client.put_object(Bucket=self.storage.bucket, Key=f"images/normal/1/BRKT01_OK_{seed:04d}.jpg",
                                       Body=sample_jpeg(0, seed, size=(160, 120)))

    def image_count(self) -> int:
        return sum(1 for _ in self.storage.list_objects("images/normal/"))

    def row(self, run_id: str) -> dict[str, Any] | None:

        return compose.deployment_registry().find_run(DAG_ID, run_id)

    def watch_until_end(self, run_id: str) -> tuple[str, set[str | None]]:
        """The run's final state and every version seen live meanwhile (each one whole)."""
        seen = {self.live_version()}
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (state := self.airflow.run_state(DAG_ID, run_id)) not in ("success", "failed"):
            assert time.monotonic() < deadline, f"run {run_id} still {state} after {RUN_TIMEOUT_S}s"
            seen.add(self.live_version())
            time.sleep(0.2)
        seen.add(self.live_version())
        return state, seen

    def assert_outcome_is_recorded_truly(self, run_id: str, state: str, before: str, seen: set) -> dict:
        """Completed with the new version live, or failed with the old one live; never left running."""
        row = self.row(run_id)
        assert row is not None and row["status"] in ("completed", "failed"), row
        live = self.live_version()
        if row["status"] == "completed":
            assert state == "success"
            assert row["result_data"]["version"] == live != before, (row, live)
            assert seen <= {before, live}, seen
        else:
            assert (live, seen) == (before, {before}), (row, live, seen)
            assert "failed" in row["result_message"], row["result_message"]
        assert not self.staging_dirs(), "a retry or the next run removes what a killed run left"
        return row


@pytest.fixture(scope="module")
def deployment(s3_server, mysql_database, clip_checkpoint, tmp_path_factory) -> Iterator[Deployment]:
    """A real Airflow over a fresh bucket and index root, and a first published version."""

    home = tmp_path_factory.mktemp("real-airflow")
    bucket = f"sched-{uuid.uuid4().hex[:10]}"
    storage = compose.object_storage(bucket=bucket)
    storage.client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "kr-standard"})
    # LocalExecutor on SQLite in the home (the harness's default), on top of the session's environment:
    # AIRFLOW_CONN_NCP_OBJECT_STORAGE / _DEPLOY_DB, dags and plugins folders, from conftest
    airflow = AirflowProcesses(home, extra_env={
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),  # not 8793: a demo Airflow may hold it
        "INSPECTION_CLIP_SCHEDULE": "none",  # manual runs only: unpausing must not start a scheduled one
        "INSPECTION_RETRY_DELAY_SECONDS": "2",
        "INSPECTION_MAX_TRANSFERS": "4",
        "INSPECTION_TRANSFER_POOL": "storage_transfers",
        "INSPECTION_BUCKET": bucket,
        "INSPECTION_INDEX_ROOT": str(home / "data" / "clip_index"),
        "INSPECTION_CACHE_ROOT": str(home / "data" / "cache"),
        "INSPECTION_CLIP_PRETRAINED": str(clip_checkpoint),
    })
    deployment = Deployment(airflow, storage, home / "data" / "clip_index")
    for seed in range(6):
        deployment.add_image(seed)
    pool = airflow.extra_env["INSPECTION_TRANSFER_POOL"], airflow.extra_env["INSPECTION_MAX_TRANSFERS"]
    try:
        airflow.start(before=[("pools", "set", *pool, POOL_DESCRIPTION)], api_timeout=120)
        airflow.unpause(DAG_ID)
        first = airflow.trigger(DAG_ID)
        assert airflow.wait_for_end(DAG_ID, first) == "success", airflow.task_instances(DAG_ID, first)
        assert deployment.row(first)["status"] == "completed"
        yield deployment
    finally:
        airflow.stop(grace=20)


def run_caught_in(deployment: Deployment, task_id: str, image_seed: int) -> tuple[str, str, Any]:
    """Add an image, trigger a run and wait until ``task_id`` (embed or index_save) is doing its real work.

    Returns (the version live before, the run id, the task's process). ``embed`` is caught once it has
    loaded torch; ``index_save`` while its staging version exists (torch and faiss are imported then,
    which keeps it there for a second or more before the atomic rename).
    """
    airflow = deployment.airflow
    before = deployment.live_version()
    deployment.add_image(image_seed)
    run_id = airflow.trigger(DAG_ID)
    _, process = airflow.running_task(DAG_ID, run_id, task_id, interval=0.1)
    if task_id == "embed":
        wait_until(lambda: has_loaded_torch(process.pid), 60, "embed to start embedding", 0.05)
    else:
        wait_until(lambda: deployment.staging_dirs() or has_ended(process), 60, f"{task_id} to stage", 0.002)
        assert deployment.staging_dirs(), f"{task_id} ended before it could be caught writing its staging version"
    return before, run_id, process


@pytest.mark.parametrize("task_id, image_seed", [("embed", 101), ("index_save", 102)])
def test_a_killed_task_process_leaves_the_old_version_live_and_the_record_true(deployment, task_id, image_seed):
    """kill -9 of the task process while embedding, or mid-way through writing the staging version."""
    airflow = deployment.airflow
    before, run_id, process = run_caught_in(deployment, task_id, image_seed)
    os.kill(process.pid, signal.SIGKILL)
    assert deployment.live_version() == before

    state, seen = deployment.watch_until_end(run_id)
    row = deployment.assert_outcome_is_recorded_truly(run_id, state, before, seen)
    if state == "success":
        assert airflow.task_instances(DAG_ID, run_id)[task_id]["try_number"] == 2  # Airflow retried the killed try
        assert row["result_data"]["num_images"] == deployment.image_count()


def mark_failed_and_check_the_record(deployment: Deployment, run_id: str, process, before: str) -> dict:
    """Mark the run failed as the UI's "Mark as failed" does; the row must be closed, nothing published."""
    airflow = deployment.airflow
    assert deployment.row(run_id)["status"] == "running"
    # Airflow calls no DAG failure callback for this; the listener in plugins/, run by the API server, does.
    airflow.api("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})
    row = wait_until(lambda: (r := deployment.row(run_id))["status"] != "running" and r, 60,
                     "the deployment row to be closed", 0.2)
    assert row["status"] == "failed" and row["completed_at"], row
    assert f"Airflow run {run_id} was marked failed through the Airflow UI or API" in row["result_message"]

    # The supervisor stops the task at its next heartbeat (SIGTERM, then SIGKILL 5 s later) unless it ends first.
    wait_until(lambda: has_ended(process), 30, "the marked run's task process to end", 0.2)
    assert airflow.run_state(DAG_ID, run_id) == "failed"
    assert deployment.live_version() == before and not deployment.staging_dirs()
    assert deployment.row(run_id)["status"] == "failed"
    return {task_id: ti["state"] for task_id, ti in airflow.task_instances(DAG_ID, run_id).items()}


def test_run_marked_failed_during_embed_closes_its_record(deployment):
    before, run_id, process = run_caught_in(deployment, "embed", 103)
    states = mark_failed_and_check_the_record(deployment, run_id, process, before)
    assert (states["embed"], states["index_save"], states["register"]) == ("failed", "skipped", "skipped"), states


def test_run_marked_failed_while_index_save_writes_publishes_nothing(deployment):
    """index_save outlives the mark by up to ~10 s (heartbeat, then an ignored SIGTERM): it must not publish."""
    airflow = deployment.airflow
    before, run_id, process = run_caught_in(deployment, "index_save", 104)
    states = mark_failed_and_check_the_record(deployment, run_id, process, before)
    assert (states["index_save"], states["register"]) == ("failed", "skipped"), states
    task_log = airflow.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=index_save" / "attempt=1.log"
    wait_until(lambda: task_log.exists() and "is not published, the live version stays" in task_log.read_text(),
               30, f"index_save's refusal in {task_log}", 0.2)


def test_a_missing_pool_fails_the_run_at_once_with_the_command_that_creates_it(deployment):
    airflow = deployment.airflow
    pool = airflow.env["INSPECTION_TRANSFER_POOL"]
    before = deployment.live_version()
    airflow.cli("pools", "delete", pool)
    try:
        run_id = airflow.trigger(DAG_ID)
        state = wait_until(lambda: (s := airflow.run_state(DAG_ID, run_id)) in ("success", "failed") and s, 60,
                           "the run without its pool to end", 0.2)
        run = airflow.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
    finally:
        airflow.cli("pools", "set", pool, airflow.env["INSPECTION_MAX_TRANSFERS"], POOL_DESCRIPTION)
    assert state == "failed"
    assert f"use pool(s) {pool}, which do not exist" in run["note"]
    assert f'airflow pools set {pool} {airflow.env["INSPECTION_MAX_TRANSFERS"]} "Object-storage downloads"' in run["note"]
    assert all(ti["state"] in (None, "none") for ti in airflow.task_instances(DAG_ID, run_id).values())  # nothing ran
    assert deployment.live_version() == before
