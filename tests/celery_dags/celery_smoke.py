"""DAGs for the CeleryExecutor test harness (tests/integration/celery_cluster.py), not for deployment.

``celery_smoke``: one task on the ``default`` queue and one on ``gpu``; each returns where it ran.
``celery_outlive_a_worker``: one ``gpu`` task whose first try waits (to be killed with its worker);
its retry returns where it ran.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta

from airflow.sdk import dag, task


def where_i_run(ti) -> dict:
    """The worker (its test hostname) and cache root this try ran with."""
    return {"worker": os.environ.get("INSPECTION_TEST_HOSTNAME"), "cache_root": os.environ.get("INSPECTION_CACHE_ROOT"),
            "try_number": ti.try_number, "pid": os.getpid()}


@dag(dag_id="celery_smoke", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, tags=["test"])
def celery_smoke():
    @task(queue="default")
    def on_default(ti=None) -> dict:
        return where_i_run(ti)

    @task(queue="gpu")
    def on_gpu(ti=None) -> dict:
        return where_i_run(ti)

    on_default()
    on_gpu()


@dag(dag_id="celery_outlive_a_worker", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, tags=["test"])
def celery_outlive_a_worker():
    @task(queue="gpu", retries=1, retry_delay=timedelta(seconds=1))
    def wait_to_be_killed(ti=None) -> dict:
        if ti.try_number == 1:
            time.sleep(600)  # the test kills this try's worker meanwhile
        return where_i_run(ti)

    wait_to_be_killed()


celery_smoke()
celery_outlive_a_worker()
