"""clip_index_normal / clip_index_defect end to end through ``dag.test()``.

Real parts: the NCP-like S3 server over HTTP, MariaDB through the Airflow MySQL
connection, a migrated Airflow metadata DB, open_clip and FAISS. The CLIP
weights are a random-init checkpoint (pretrained weights cannot be downloaded
here); the checks are about the pipeline and the formats, not about similarity.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from inspection_refresh import compose

from tests.integration.dag_runner import asset_events, clip_dag_env, run_dag
from tests.samples import sample_jpeg

pytestmark = pytest.mark.slow

SIZE = (320, 240)


def jpeg(product_index: int, seed: int, defect: str | None = None) -> bytes:
    return sample_jpeg(product_index, seed, defect, size=SIZE)


@pytest.fixture
def env(s3_server, mysql_database, airflow_db, clip_checkpoint, sql, tmp_path, monkeypatch):
    """A fresh bucket, index root and cache for one test; products 1 and 2 in the products table."""
    return clip_dag_env("clip", clip_checkpoint, sql, tmp_path, monkeypatch)


def seed_normal(put, per_product: int = 4) -> list[str]:
    keys = []
    for product_id, code in ((1, "BRKT01"), (2, "FABR02")):
        put(f"images/normal/{product_id}/", b"")  # folder marker, as the upload pages make
        for seq in range(per_product):
            key = f"images/normal/{product_id}/{code}_OK_{seq:03d}.jpg"
            put(key, jpeg(product_id - 1, seq))
            keys.append(key)
    return keys


def deployment_row(sql, run_id: str) -> dict:
    rows = sql("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s", (run_id,))
    assert len(rows) == 1, f"expected exactly one deployment_logs row for {run_id}, got {len(rows)}"
    row = rows[0]
    row["result_data"] = json.loads(row["result_data"])
    return row


def live_version(root: Path, index_type: str) -> str | None:
    link = root / index_type
    return Path(link.readlink()).name if link.is_symlink() else None


def test_normal_index_end_to_end_loads_like_the_service(env):
    import faiss
    import torch
    from inspection_refresh.clip.embed import embed_image, load_model

    keys = seed_normal(env["put"])
    env["put"]("images/normal/1/notes.txt", b"not an image")
    env["put"]("images/normal/2/empty.jpg", b"")
    env["put"]("images/normal/2/corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")

    result = run_dag("clip_index_normal")
    assert result.state == "success", result.task_states
    live = env["root"] / "normal"
    assert {p.name for p in live.iterdir()} >= {"faiss_index.bin", "index_data.pt", "embeddings.pt",
                                                 "metadata.json", "manifest.json"}

    # Load the way the service does and search with the service's query embedding.
    index = faiss.read_index(str(live / "faiss_index.bin"))
    data = torch.load(live / "index_data.pt", weights_only=False)
    metadata = json.loads((live / "metadata.json").read_text())
    assert index.ntotal == len(data["gallery_paths"]) == metadata["num_images"] == len(keys)
    assert metadata["metadata"][0]["product_code"] == "BRKT01" and metadata["metadata"][0]["product_name"] == "Bracket"
    manifest = json.loads((live / "manifest.json").read_text())
    model = load_model(manifest["model"], manifest["pretrained"], "cpu")
    for row in (0, len(keys) - 1):
        gallery_path = data["gallery_paths"][row]
        assert Path(gallery_path).is_file()
        query = embed_image(gallery_path, model).reshape(1, -1)
        _, ids = index.search(query, 1)
        assert data["gallery_paths"][ids[0][0]] == gallery_path

    row = deployment_row(env["sql"], result.run_id)
    assert row["deploy_type"] == "clip_rebuild" and row["status"] == "completed"
    assert row["completed_at"] is not None
    facts = row["result_data"]
    assert facts["num_images"] == len(keys) and facts["embedding_dim"] == 512 and facts["random_weights"] is True
    assert "RANDOM weights" in row["result_message"]
    skipped = {key for key, _ in facts["skipped_objects"]}
    assert skipped == {"images/normal/1/notes.txt", "images/normal/2/empty.jpg"}
    assert [key for key, _ in facts["unreadable_images"]] == ["images/normal/2/corrupt.jpg"]
    assert (facts["num_skipped_objects"], facts["num_unreadable_images"]) == (2, 1)
    assert "2 objects skipped (see skipped_objects), 1 image unreadable (see unreadable_images)" in row[
        "result_message"], row["result_message"]

    events = asset_events("clip_index_normal")
    assert events and events[-1]["num_images"] == len(keys) and events[-1]["version"] == live_version(
        env["root"], "normal")


def test_rerun_after_adding_one_image_embeds_exactly_one(env):
    keys = seed_normal(env["put"], per_product=3)
    first = run_dag("clip_index_normal")
    assert first.state == "success"
    env["put"]("images/normal/2/FABR02_OK_999.jpg", jpeg(1, 999))
    second = run_dag("clip_index_normal")
    assert second.state == "success"
    facts = deployment_row(env["sql"], second.run_id)["result_data"]
    assert (facts["embedded"], facts["cached"], facts["num_images"]) == (1, len(keys), len(keys) + 1)
    assert facts["downloaded"] == 1


def test_defect_index_records_defect_metadata(env):
    for seq, defect in enumerate(("scratch", "hole", "stain")):
        env["put"](f"images/defect/1_{seq + 1}/BRKT01_D{seq + 1}_{seq:03d}.jpg", jpeg(0, 50 + seq, defect))
    result = run_dag("clip_index_defect")
    assert result.state == "success", result.task_states
    records = json.loads((env["root"] / "defect" / "metadata.json").read_text())["metadata"]
    assert [(r["product_id"], r["defect_type_id"], r["defect_code"], r["image_type"]) for r in records] == [
        (1, 1, "D1", "defect"), (1, 2, "D2", "defect"), (1, 3, "D3", "defect")]
    assert records[0]["storage_url"].endswith("/images/defect/1_1/BRKT01_D1_000.jpg")


def test_normal_and_defect_runs_with_one_run_id_keep_a_row_each(env):
    """Both DAGs share a schedule, so their scheduled runs share a run id: each still gets its own true row."""
    seed_normal(env["put"], per_product=2)
    same_time = datetime(2026, 11, 27, 2, 0, tzinfo=timezone.utc)
    normal = run_dag("clip_index_normal", logical_date=same_time)
    defect = run_dag("clip_index_defect", {"prefix": "images/nothing-here/"}, logical_date=same_time)

    assert normal.run_id == defect.run_id
    assert (normal.state, defect.state) == ("success", "failed")
    rows = env["sql"]("SELECT status, result_message, JSON_VALUE(result_data, '$.airflow_dag_id') AS dag_id "
                      "FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s "
                      "ORDER BY deploy_id", (normal.run_id,))
    assert [(r["dag_id"], r["status"]) for r in rows] == [("clip_index_normal", "completed"),
                                                           ("clip_index_defect", "failed")]
    assert rows[0]["result_message"].startswith("normal index version")
    assert "defect index rebuild failed" in rows[1]["result_message"]


def run_note(dag_id: str, run_id: str) -> str | None:
    """The note on the run's page in the UI."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one().note


def test_unchanged_images_skip_the_rebuild_visibly(env, caplog):
    seed_normal(env["put"], per_product=2)
    first = run_dag("clip_index_normal")
    assert first.state == "success"
    version = live_version(env["root"], "normal")
    assert run_note("clip_index_normal", first.run_id).startswith(f"normal index version {version} published: 4 images")
    rows_before = env["sql"]("SELECT COUNT(*) AS n FROM deployment_logs")[0]["n"]
    caplog.clear()
    skipped = run_dag("clip_index_normal", {"skip_if_unchanged": True})
    assert skipped.state == "success"
    assert skipped.task_states["download"] == "skipped" and skipped.task_states["register"] == "skipped"
    why = (f"images under images/normal/ are unchanged since the published normal index (version {version}, "
           "4 images, same model): skipping the rebuild. Trigger with full_rebuild=true to force one.")
    assert why in caplog.messages  # download's log says why it skips ...
    assert run_note("clip_index_normal", skipped.run_id) == f"Nothing published: {why}"  # ... and so does the run
    assert live_version(env["root"], "normal") == version
    assert env["sql"]("SELECT COUNT(*) AS n FROM deployment_logs")[0]["n"] == rows_before
    forced = run_dag("clip_index_normal", {"skip_if_unchanged": True, "full_rebuild": True})
    assert forced.state == "success" and live_version(env["root"], "normal") != version


def test_unchanged_manual_runs_publish_one_version_and_keep_the_older_ones(env, monkeypatch):
    from inspection_refresh.publish import Publisher

    monkeypatch.setenv("INSPECTION_KEEP_VERSIONS", "3")
    publisher = Publisher(env["root"])
    older = ["20250101T000000000000Z", "20250102T000000000000Z"]
    for version in older:  # versions of other images, e.g. last month's
        staging = publisher.stage("normal")
        (staging / "manifest.json").write_text(json.dumps({"version": version}))
        publisher.publish("normal", staging, version)
    seed_normal(env["put"], per_product=1)

    runs = [run_dag("clip_index_normal") for _ in range(6)]
    assert [(r.state, r.task_states["register"]) for r in runs] == [("success", "success")] * 6
    version = live_version(env["root"], "normal")
    assert publisher.versions("normal") == [*older, version]
    for run in runs[1:]:
        row = deployment_row(env["sql"], run.run_id)
        assert row["status"] == "completed" and row["result_data"]["unchanged"] is True
        assert f"unchanged, version {version} stays live" in row["result_message"], row["result_message"]
    assert deployment_row(env["sql"], runs[0].run_id)["result_data"]["unchanged"] is False


def test_scheduled_runs_skip_when_unchanged_but_manual_runs_rebuild(env):
    from inspection_refresh.tasks import clip_index as pipeline
    from inspection_refresh.tasks.common import NothingToDo

    seed_normal(env["put"], per_product=1)
    assert run_dag("clip_index_normal").state == "success"
    run = dict(index_type="normal", prefix="images/normal/", pretrained=os.environ["INSPECTION_CLIP_PRETRAINED"])
    with pytest.raises(NothingToDo, match="unchanged since the published normal index"):
        pipeline.download(pipeline.ClipRun(run_id="scheduled__x", scheduled=True, **run))
    pipeline.download(pipeline.ClipRun(run_id="manual__x", scheduled=False, **run))  # no skip


def assert_failed_cleanly(env, result, message_part: str, version_before: str | None, *, staged_kept: int = 0) -> dict:
    """The run failed with a row naming ``message_part``, the live version unchanged; ``staged_kept``: staged
    versions left for a cleared publish (one when publish itself failed)."""
    from inspection_refresh.config import default_releases_dir

    assert result.state == "failed"
    assert result.task_states["register"] == "failed"  # the run is marked failed, after recording it
    row = deployment_row(env["sql"], result.run_id)
    assert row["status"] == "failed" and row["completed_at"] is not None
    assert message_part in row["result_message"], row["result_message"]
    assert live_version(env["root"], "normal") == version_before
    assert len(list((default_releases_dir(env["root"]) / "normal").glob(".staging-*"))) == staged_kept
    return row


def test_empty_prefix_fails_clearly_and_keeps_the_live_index(env):
    seed_normal(env["put"], per_product=1)
    assert run_dag("clip_index_normal").state == "success"
    version = live_version(env["root"], "normal")
    result = run_dag("clip_index_normal", {"prefix": "images/nothing-here/"})
    row = assert_failed_cleanly(env, result, "no images under", version)
    assert "live index is unchanged (version " + version in row["result_message"]


def test_missing_bucket_fails_clearly(env, monkeypatch):
    monkeypatch.setenv("INSPECTION_BUCKET", "bucket-that-does-not-exist")
    result = run_dag("clip_index_normal")
    assert_failed_cleanly(env, result, "bucket 'bucket-that-does-not-exist' does not exist", None)


def test_wrong_credentials_fail_clearly(env, s3_server, monkeypatch):
    from tests.conftest import storage_connection

    monkeypatch.setenv("AIRFLOW_CONN_NCP_OBJECT_STORAGE", storage_connection(s3_server.endpoint, "wrong-key"))
    result = run_dag("clip_index_normal")
    row = assert_failed_cleanly(env, result, "rejected the credentials", None)
    assert "test-secret-key" not in row["result_message"]


def test_a_crash_between_writing_and_publishing_leaves_the_old_index_live(env, monkeypatch):
    from inspection_refresh.publish import Publisher

    seed_normal(env["put"], per_product=1)
    assert run_dag("clip_index_normal").state == "success"
    version = live_version(env["root"], "normal")
    old_index = (env["root"] / "normal" / "faiss_index.bin").read_bytes()
    env["put"]("images/normal/1/BRKT01_OK_777.jpg", jpeg(0, 777))

    def crash(self, name, staging, version=None, **options):
        assert (Path(staging) / "faiss_index.bin").exists()  # everything was written...
        raise OSError("simulated crash before the swap")  # ...and the process died before publishing

    monkeypatch.setattr(Publisher, "publish", crash)
    result = run_dag("clip_index_normal", {"full_rebuild": True})
    row = assert_failed_cleanly(env, result, "simulated crash before the swap", version, staged_kept=1)
    assert "is kept: clearing publish retries publishing it without a rebuild" in row["result_message"]
    assert (env["root"] / "normal" / "faiss_index.bin").read_bytes() == old_index


def test_a_run_closes_the_row_an_ended_earlier_run_left_running(env):

    seed_normal(env["put"], per_product=1)
    first = run_dag("clip_index_normal")
    assert first.state == "success"
    # The database was down when register and the failure callback tried to write: the row stayed open.
    env["sql"]("UPDATE deployment_logs SET status = 'running', completed_at = NULL "
               "WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s", (first.run_id,))
    unknown_to_airflow = f"manual__{uuid.uuid4()}"  # e.g. another Airflow writing to the same table
    compose.deployment_registry().start("clip_rebuild", "clip_index_normal", unknown_to_airflow)

    second = run_dag("clip_index_normal")  # Airflow (Task SDK) says the first run ended "success"
    assert second.state == "success"
    old = deployment_row(env["sql"], first.run_id)
    assert old["status"] == "failed" and old["completed_at"] is not None
    assert old["result_message"] == (f"closed by run {second.run_id}: Airflow run {first.run_id} ended success "
                                     "without closing its deployment record")
    assert deployment_row(env["sql"], second.run_id)["status"] == "completed"
    assert deployment_row(env["sql"], unknown_to_airflow)["status"] == "running"  # not guessed


def test_a_cleared_register_of_a_completed_run_keeps_the_row(env):
    from inspection_refresh.tasks import clip_index as pipeline

    run = pipeline.ClipRun(index_type="normal", run_id=f"manual__{uuid.uuid4()}", prefix="images/normal/")
    registry = compose.deployment_registry()
    registry.start(pipeline.DEPLOY_TYPE, run.dag_id, run.run_id)
    registry.finish(pipeline.DEPLOY_TYPE, run.dag_id, run.run_id, status="completed", message="version v1 published",
                    result_data={"version": "v1", "num_images": 2})
    # The completed run removed its work files; an operator now clears its register task.
    outcome = pipeline.register(run)
    assert (outcome["status"], outcome["message"], outcome["version"]) == ("completed", "version v1 published", "v1")
    row = deployment_row(env["sql"], run.run_id)
    assert (row["status"], row["result_message"]) == ("completed", "version v1 published")


def test_a_run_failing_before_register_records_is_closed_by_the_failure_callback(env, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException
    from inspection_refresh.tasks import clip_index as pipeline

    def register_loses_the_database(run):
        raise AirflowFailException("simulated: the database went away during register")

    monkeypatch.setattr(pipeline, "register", register_loses_the_database)
    result = run_dag("clip_index_normal", {"prefix": "images/nothing-here/"})  # download opens the row, fails
    assert result.state == "failed" and result.task_states["register"] == "failed"
    row = deployment_row(env["sql"], result.run_id)
    assert row["status"] == "failed" and row["completed_at"] is not None
    assert row["result_message"].startswith(f"Airflow run {result.run_id} failed before recording its outcome: "
                                            "task register failed"), row["result_message"]


def published_index(root: Path, index_type: str = "normal") -> dict:
    """What a published index says, without what legitimately differs per version (paths, times)."""
    live = (root / index_type).resolve()
    metadata = json.loads((live / "metadata.json").read_text())
    return {
        "faiss_index.bin": (live / "faiss_index.bin").read_bytes(),
        "embeddings.pt": (live / "embeddings.pt").read_bytes(),
        "records": [{k: v for k, v in record.items() if k != "local_path"} for record in metadata["metadata"]],
        "version": live.name,
    }


def test_a_flaky_store_publishes_the_same_index_as_a_healthy_one(env, s3_server, tmp_path):
    from inspection_refresh.dev.ncp_emulator import Faults

    keys = seed_normal(env["put"], per_product=3)
    seed = 2
    probe = Faults(slowdown_rate=0.1, cut_rate=0.1, seed=seed)
    assert {"slowdown", "cut"} <= {probe.object_fault(key) for key in keys}, "the seed must inject both faults"

    assert run_dag("clip_index_normal").state == "success"
    healthy = published_index(env["root"])
    shutil.rmtree(tmp_path / "cache" / "clip" / "normal" / "images")  # download everything again
    with s3_server.faults(slowdown_rate=0.1, cut_rate=0.1, seed=seed):
        flaky = run_dag("clip_index_normal", {"full_rebuild": True})  # and embed it again
    assert flaky.state == "success", flaky.task_states
    facts = deployment_row(env["sql"], flaky.run_id)["result_data"]
    assert (facts["downloaded"], facts["num_images"], facts["missing_images"]) == (len(keys), len(keys), [])
    rebuilt = published_index(env["root"])
    assert rebuilt.pop("version") != healthy.pop("version")
    assert rebuilt == healthy


def test_an_image_that_never_downloads_publishes_nothing_unless_allowed_missing(env, s3_server):
    keys = seed_normal(env["put"], per_product=2)
    broken = keys[1]
    with s3_server.faults(always_fail=[broken]):
        failed = run_dag("clip_index_normal")
        assert failed.task_states["download"] == "failed"  # after Airflow's retries of the task
        row = assert_failed_cleanly(env, failed, broken, None)
        assert row["result_data"]["missing_images"] == [broken]
        assert "max_missing_images" in row["result_message"]

        partial = run_dag("clip_index_normal", {"max_missing_images": 1})
    assert partial.state == "success", partial.task_states
    row = deployment_row(env["sql"], partial.run_id)
    assert row["status"] == "completed" and "1 MISSING" in row["result_message"]
    assert row["result_data"]["missing_images"] == [broken] and row["result_data"]["num_images"] == len(keys) - 1
    manifest = json.loads((env["root"] / "normal" / "manifest.json").read_text())
    assert manifest["missing_images"] == [broken] and manifest["count"] == len(keys) - 1

    # The partial index is not what storage holds: a run that skips unchanged images rebuilds it.
    complete = run_dag("clip_index_normal", {"skip_if_unchanged": True})
    assert complete.task_states["download"] == "success" and complete.state == "success"
    manifest = json.loads((env["root"] / "normal" / "manifest.json").read_text())
    assert manifest["missing_images"] == [] and manifest["count"] == len(keys)
