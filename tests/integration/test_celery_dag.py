"""clip_index_normal on a multi-worker CeleryExecutor Airflow with no shared disk (issue #9's must-show).

The harness (``tests/integration/celery_cluster.py``) runs the repository's ``dags/`` with
``INSPECTION_RUN_STORE=storage`` and ``INSPECTION_HEAVY_QUEUE=gpu`` on three Celery workers, each with
its own hostname and its own "disk" (cache root, index root, releases): ``worker-default`` serves the
``default`` queue (download, index_save, approve, publish, register), ``worker-gpu-1`` and ``worker-gpu-2``
serve ``gpu`` (embed). The tasks of a run share nothing but object storage (the run store, the release
channel) and the databases. Publishing goes to the workers' working copy and to the release channel
(``INSPECTION_PUBLISH_TARGETS=both``); the test reads the published index the way a serving node gets
it: ``inspection-publish pull`` into a directory of its own, without Airflow.

1. A run completes end to end; download and embed ran on different workers; the pulled index loads in
   the service's formats and FAISS finds each gallery image first; the run's objects under the run-store
   prefix are gone once it completed.
2. The gpu worker running ``embed`` is killed (``kill -9`` of its whole process tree) during the embed:
   Airflow retries the task on the other gpu worker and the run completes there.

Time on the 2-core development machine: about 3 minutes for the module (2m45s-3m15s measured): ~30 s
to start the cluster (3 workers), well under a minute for the first run (every task's process imports
Airflow and the library, embed also torch and open_clip), about a minute and a half for the kill test
(20 s heartbeat timeout, the retry), ~10 s to stop. ``-m "not celery"`` leaves it out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from inspection_refresh import compose

from tests.integration.celery_cluster import WorkerSpec, running_cluster
from tests.integration.test_clip_dag import deployment_row, jpeg, seed_normal
from tests.integration.airflow_processes import has_ended

pytestmark = [pytest.mark.slow, pytest.mark.celery]

DAG_ID = "clip_index_normal"
REPO = Path(__file__).resolve().parents[2]
WORKERS = (WorkerSpec("worker-default", ("default",)), WorkerSpec("worker-gpu-1", ("gpu",)),
           WorkerSpec("worker-gpu-2", ("gpu",)))
GPU_WORKERS = {"worker-gpu-1", "worker-gpu-2"}
RUN_STORE_PREFIX = "airflow-runs/"


@pytest.fixture(scope="module")
def cluster(s3_server, mysql_database, clip_checkpoint, tmp_path_factory):
    """The repository's DAGs on three Celery workers, a fresh bucket, the products table."""
    import MySQLdb
    from inspection_refresh.registry import CREATE_PRODUCTS

    bucket = f"celery-{uuid.uuid4().hex[:10]}"
    storage = compose.object_storage(bucket=bucket)
    storage.client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "kr-standard"})
    conn = MySQLdb.connect(**mysql_database, autocommit=True)
    conn.cursor().execute(CREATE_PRODUCTS)
    conn.cursor().execute("INSERT IGNORE INTO products (product_id, product_code, product_name) VALUES "
                          "(1, 'BRKT01', 'Bracket'), (2, 'FABR02', 'Fabric')")
    conn.close()
    settings = {
        "INSPECTION_BUCKET": bucket,
        "INSPECTION_RUN_STORE": "storage",
        "INSPECTION_RUN_STORE_PREFIX": RUN_STORE_PREFIX,
        "INSPECTION_HEAVY_QUEUE": "gpu",
        "INSPECTION_PUBLISH_TARGETS": "both",
        "INSPECTION_CLIP_SCHEDULE": "none",  # unpausing must not start a scheduled run
        "INSPECTION_MAX_TRANSFERS": "4",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        with running_cluster(tmp_path_factory.mktemp("celery-dags"), dags_folder=REPO / "dags",
                             workers=WORKERS) as started:
            started.cli("pools", "set", "storage_transfers", "4", "Object-storage downloads")
            started.cli("pools", "set", "patchcore_build", "1", "PatchCore builds")
            started.unpause(DAG_ID)
            started.storage = storage
            yield started


def put(storage, key: str, body: bytes) -> None:
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=body)


def run_objects(storage, run_id: str) -> list[str]:
    """The run's objects in the run store (``<prefix>clip/normal-<run>/...``)."""
    from inspection_refresh.tasks.common import safe_run_id

    return [obj.key for obj in storage.list_objects(f"{RUN_STORE_PREFIX}clip/normal-{safe_run_id(run_id)}/",
                                                    include_folders=True)]


def pull(storage, node: Path) -> subprocess.CompletedProcess:
    """``inspection-publish pull`` on a serving node: its own root, credentials from the AWS variables only."""
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("AIRFLOW_CONN_", "INSPECTION_"))}
    env.update(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
    endpoint = storage.client.meta.endpoint_url
    return subprocess.run(
        [str(Path(sys.executable).with_name("inspection-publish")), "pull", "--endpoint-url", endpoint,
         "--region", "kr-standard", "--bucket", storage.bucket, "--artefact", "clip:normal",
         "--index-root", str(node / "clip_index")],
        env=env, capture_output=True, text=True, timeout=300)


def check_served_index(storage, node: Path, expected_images: int) -> str:
    """Pull the channel's current index onto ``node``; load it as the service does; every gallery image
    finds itself first. Returns the version."""
    import faiss
    import torch
    from inspection_refresh.clip.embed import embed_image, load_model

    pulled = pull(storage, node)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    live = node / "clip_index" / "normal"
    index = faiss.read_index(str(live / "faiss_index.bin"))
    data = torch.load(live / "index_data.pt", weights_only=False)
    metadata = json.loads((live / "metadata.json").read_text())
    manifest = json.loads((live / "manifest.json").read_text())
    assert index.ntotal == len(data["gallery_paths"]) == metadata["num_images"] == expected_images
    current = json.loads(storage.client.get_object(Bucket=storage.bucket,
                                                   Key="deployments/clip/normal/current.json")["Body"].read())
    assert live.resolve().name == manifest["version"] == current["version"]
    model = load_model(manifest["model"], manifest["pretrained"], "cpu")
    for row, gallery_path in enumerate(data["gallery_paths"]):
        # The index names its images inside the version directory it was built in (the worker's);
        # on this node the same image is at the same place inside the pulled version.
        built_in = next(parent for parent in Path(gallery_path).parents if parent.name == manifest["version"])
        image = live / Path(gallery_path).relative_to(built_in)
        assert image.is_file(), image
        _, ids = index.search(embed_image(image, model).reshape(1, -1), 1)
        assert ids[0][0] == row, (row, gallery_path)
        assert metadata["metadata"][row]["local_path"] == gallery_path
    return manifest["version"]


def test_a_run_spreads_over_workers_and_publishes_a_correct_index(cluster, sql, tmp_path):
    keys = seed_normal(lambda key, body: put(cluster.storage, key, body))
    run_id = cluster.trigger(DAG_ID)
    assert cluster.wait_for_end(DAG_ID, run_id, timeout=420) == "success", cluster.task_instances(DAG_ID, run_id)

    tis = cluster.task_instances(DAG_ID, run_id)
    assert {task: ti["state"] for task, ti in tis.items()} == {
        task: "success" for task in ("download", "embed", "index_save", "approve", "publish", "register")}
    assert tis["embed"]["queue"] == "gpu" and tis["download"]["queue"] == "default"
    assert tis["download"]["hostname"] == "worker-default" and tis["embed"]["hostname"] in GPU_WORKERS
    assert tis["download"]["hostname"] != tis["embed"]["hostname"]
    assert {tis[task]["hostname"] for task in ("index_save", "publish", "register")} == {"worker-default"}

    # embed read its images from its own worker's mirror, filled from the run's inventory
    embed_mirror = cluster.cache_root(tis["embed"]["hostname"]) / "clip" / "normal" / "images"
    assert len([p for p in embed_mirror.rglob("*.jpg")]) == len(keys)
    # nothing went through a local work directory
    assert not [path for worker in cluster.processes if worker.startswith("worker-")
                for path in (cluster.cache_root(worker) / "clip" / "runs").glob("*")]

    version = check_served_index(cluster.storage, tmp_path / "serving-node", len(keys))
    row = deployment_row(sql, run_id)
    assert row["status"] == "completed" and row["result_data"]["version"] == version, row["result_message"]
    assert row["result_data"]["num_images"] == len(keys)
    assert run_objects(cluster.storage, run_id) == []  # removed once the run completed


def test_a_killed_embed_worker_is_replaced_by_the_other_gpu_worker(cluster, sql, tmp_path):
    put(cluster.storage, "images/normal/2/FABR02_OK_901.jpg", jpeg(1, 901))
    put(cluster.storage, "images/normal/1/BRKT01_OK_902.jpg", jpeg(0, 902))
    run_id = cluster.trigger(DAG_ID, {"full_rebuild": True})  # embed every image again: a longer embed
    ti, process = cluster.running_task(DAG_ID, run_id, "embed", timeout=300)
    victim = ti["hostname"]
    assert victim in GPU_WORKERS and ti["try_number"] == 1
    assert run_objects(cluster.storage, run_id)  # the download's inventory and records are in the store

    killed = cluster.kill_worker(victim)  # its Celery processes, the task's supervisor and the task
    assert process.pid in {member.pid for member in killed} and all(has_ended(member) for member in killed)

    assert cluster.wait_for_end(DAG_ID, run_id, timeout=420) == "success", cluster.task_instances(DAG_ID, run_id)
    embed = cluster.task_instances(DAG_ID, run_id)["embed"]
    (survivor,) = GPU_WORKERS - {victim}
    assert (embed["try_number"], embed["hostname"], embed["state"]) == (2, survivor, "success")

    version = check_served_index(cluster.storage, tmp_path / "serving-node", 10)
    row = deployment_row(sql, run_id)
    assert row["status"] == "completed" and row["result_data"]["version"] == version
    assert row["result_data"]["embedded"] == 10  # all of them, on the surviving worker
    assert run_objects(cluster.storage, run_id) == []
