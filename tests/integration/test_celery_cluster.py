"""The CeleryExecutor harness works: tasks run on the worker serving their queue, and a task whose
worker dies (kill -9 of its whole process tree) is retried on another worker.

The module takes about 60-75 s on the 2-core development machine: 17-21 s to start the harness
(``db migrate``, API server, scheduler, DAG processor, two Celery workers answering a ping; logged as
``Celery cluster started in ...`` with ``-o log_cli=true``), 7-8 s for the two-queue run (the DAG
processor's first parse included), about 30 s for the kill test (20 s heartbeat timeout, a third worker's
start, the retry) and 5-10 s to stop everything. ``-m "not celery"`` leaves it out.
"""

from __future__ import annotations

import logging

import pytest

from tests.integration.celery_cluster import WorkerSpec, celery_cluster  # noqa: F401  (fixture)
from tests.integration.airflow_processes import has_ended

pytestmark = [pytest.mark.slow, pytest.mark.celery]

log = logging.getLogger(__name__)


def test_each_task_runs_on_the_worker_serving_its_queue(celery_cluster):
    cluster = celery_cluster
    log.info("Celery cluster started in %.1fs", cluster.startup_seconds)
    cluster.unpause("celery_smoke")
    run_id = cluster.trigger("celery_smoke")
    assert cluster.wait_for_end("celery_smoke", run_id) == "success", cluster.task_instances("celery_smoke", run_id)

    tis = cluster.task_instances("celery_smoke", run_id)
    assert (tis["on_default"]["queue"], tis["on_gpu"]["queue"]) == ("default", "gpu")
    assert (tis["on_default"]["hostname"], tis["on_gpu"]["hostname"]) == ("worker-default", "worker-gpu")
    for task_id, worker in (("on_default", "worker-default"), ("on_gpu", "worker-gpu")):
        ran = cluster.xcom("celery_smoke", run_id, task_id)
        assert ran["worker"] == worker and ran["cache_root"] == str(cluster.cache_root(worker)), ran


def test_a_task_whose_worker_is_killed_is_retried_on_another_worker(celery_cluster):
    cluster = celery_cluster
    cluster.unpause("celery_outlive_a_worker")
    run_id = cluster.trigger("celery_outlive_a_worker")
    ti, process = cluster.running_task("celery_outlive_a_worker", run_id, "wait_to_be_killed")
    assert ti["hostname"] == "worker-gpu"

    killed = cluster.kill_worker("worker-gpu")  # its Celery processes, the task's supervisor and the task
    assert process.pid in {member.pid for member in killed} and all(has_ended(member) for member in killed)
    assert not cluster.worker_processes("worker-gpu")

    cluster.start_worker(WorkerSpec("worker-gpu-2", ("gpu",)))
    assert cluster.wait_for_end("celery_outlive_a_worker", run_id) == "success"
    retried = cluster.task_instances("celery_outlive_a_worker", run_id)["wait_to_be_killed"]
    assert (retried["try_number"], retried["hostname"]) == (2, "worker-gpu-2")
    assert cluster.xcom("celery_outlive_a_worker", run_id, "wait_to_be_killed")["worker"] == "worker-gpu-2"
