"""The optional approval step before publishing, end to end through ``dag.test()``.

A run with ``require_approval`` parks its ``approve`` task in Airflow's ``awaiting_input`` state;
``dag.test()`` keeps the run alive until a response arrives from outside. The response comes the way
an operator's does: a person signed in to Airflow's REST API (Airflow's own API app, with its
SimpleAuthManager users, served in this process through FastAPI's test client, on the same metadata
DB) reads the request on ``.../taskInstances/approve/-1/hitlDetails`` and answers it with a PATCH,
from a second thread while ``dag.test()`` runs. The response timeout is enforced by the scheduler's
own sweep (``SchedulerJobRunner.check_awaiting_input_timeouts``), called the same way.

Real parts as in the other DAG tests: the NCP-like S3 server, MariaDB, open_clip/FAISS, the
PatchCore builder (random-init weights).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.integration.dag_runner import clip_dag_env, patchcore_dag_env, run_dag
from tests.integration.test_clip_dag import (
    deployment_row,
    jpeg,
    live_version,
    seed_normal,
)

pytestmark = pytest.mark.slow

USERS = {"alice": secrets.token_urlsafe(12), "bob": secrets.token_urlsafe(12)}


@pytest.fixture(scope="module")
def airflow_api(airflow_db, tmp_path_factory):
    """Airflow's REST API app in this process, with two users who may answer approval requests."""
    from fastapi.testclient import TestClient

    passwords = tmp_path_factory.mktemp("auth") / "passwords.json"
    passwords.write_text(json.dumps(USERS))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", ",".join(f"{user}:admin" for user in USERS))
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
        from airflow.api_fastapi.app import create_app

        yield TestClient(create_app())


@dataclass
class Approver:
    """Answers the next approval request of ``dag_id`` as ``user``, from its own thread.

    ``answer`` is ``Approve``, ``Reject``, or ``None`` to let the request time out (then the
    scheduler's timeout sweep runs once the request's deadline has passed).
    """

    api: object
    dag_id: str
    user: str
    answer: str | None
    request: dict = field(default_factory=dict)
    response: dict = field(default_factory=dict)
    error: BaseException | None = None

    def __enter__(self) -> Approver:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(60)

    def _waiting_task(self):
        from airflow.models.hitl import HITLDetail
        from airflow.models.taskinstance import TaskInstance as TI
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            return session.execute(
                select(TI.run_id, TI.task_id, TI.map_index, TI.trigger_timeout)
                .join(HITLDetail, HITLDetail.ti_id == TI.id)
                .where(TI.dag_id == self.dag_id, TI.state == "awaiting_input")).first()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + 900
            while not (waiting := self._waiting_task()):
                assert time.monotonic() < deadline, f"no approval request of {self.dag_id} appeared"
                time.sleep(0.5)
            path = (f"/api/v2/dags/{self.dag_id}/dagRuns/{waiting.run_id}/taskInstances/{waiting.task_id}/"
                    f"{waiting.map_index}/hitlDetails")
            token = self.api.post("/auth/token", json={"username": self.user, "password": USERS[self.user]})
            assert token.status_code == 201, token.text
            headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
            found = self.api.get(path, headers=headers)
            assert found.status_code == 200, found.text
            self.request = found.json()
            if self.answer is None:
                self._let_it_time_out(waiting.trigger_timeout)
                return
            answered = self.api.patch(path, headers=headers,
                                      json={"chosen_options": [self.answer], "params_input": {}})
            assert answered.status_code == 200, answered.text
            self.response = answered.json()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    @staticmethod
    def _let_it_time_out(timeout_at) -> None:
        from airflow.jobs.job import Job
        from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

        assert timeout_at is not None, "the request has no response timeout"
        while datetime.now(timezone.utc) <= timeout_at:
            time.sleep(0.5)
        SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()

    def check(self) -> None:
        if self.error:
            raise self.error


def hitl_details(dag_id: str, run_id: str) -> list:
    """The approval requests Airflow holds for a run."""
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return list(session.scalars(select(HITLDetail.ti_id).join(TI, HITLDetail.ti_id == TI.id)
                                    .where(TI.dag_id == dag_id, TI.run_id == run_id)))


def staging_dirs(releases: Path) -> list[Path]:
    return list(releases.glob("*/.staging-*"))


def files_sha256(directory: Path, skip: tuple[str, ...] = ()) -> str:
    """What an approval names a version or bank by: the sha256 of its files' sorted (path, size, sha256)."""
    from inspection_refresh.files import tree_digest, tree_files

    return tree_digest(tree_files(directory, skip=skip))


def failing_publishes(monkeypatch, times: int | None = None) -> list[str]:
    """Make ``Publisher.publish`` raise a transient StorageError (the channel refusing an upload), ``times``
    times (``None``: always); returns the names it refused."""
    from inspection_refresh.publish import Publisher
    from inspection_refresh.storage import StorageError

    publish, refused = Publisher.publish, []

    def flaky(self, name, staging, *args, **kwargs):
        if times is None or len(refused) < times:
            refused.append(name)
            raise StorageError(f"simulated: the release channel refused the upload of {name}", transient=True)
        return publish(self, name, staging, *args, **kwargs)

    monkeypatch.setattr(Publisher, "publish", flaky)
    return refused


# ------------------------------------------------------------------------------------------ CLIP


@pytest.fixture
def clip(s3_server, mysql_database, airflow_db, clip_checkpoint, sql, tmp_path, monkeypatch):
    """A fresh bucket, index root and cache; products 1 and 2 in the products table."""
    return clip_dag_env("appr", clip_checkpoint, sql, tmp_path, monkeypatch)


def first_version_without_approval(clip) -> str:
    """Seed 4 images and publish a first version; the approval step passes at once (no request)."""
    seed_normal(clip["put"], per_product=2)
    started = time.monotonic()
    first = run_dag("clip_index_normal")
    assert first.state == "success", first.task_states
    assert first.task_states["approve"] == "success" and first.task_states["publish"] == "success"
    assert hitl_details("clip_index_normal", first.run_id) == []  # nobody was asked
    assert deployment_row(clip["sql"], first.run_id)["result_data"]["approval"] == {
        "status": "ok", "required": False, "decision": "not required"}
    assert time.monotonic() - started < 300
    return live_version(clip["root"], "normal")


def test_an_approved_clip_index_is_published(clip, airflow_api):
    before = first_version_without_approval(clip)
    clip["put"]("images/normal/2/FABR02_OK_900.jpg", jpeg(1, 900))
    clip["put"]("images/normal/2/corrupt_HOL_9999.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")  # unreadable

    with Approver(airflow_api, "clip_index_normal", "alice", "Approve") as approver:
        result = run_dag("clip_index_normal", {"require_approval": True})
    approver.check()
    assert result.state == "success", result.task_states
    assert [result.task_states[t] for t in ("index_save", "approve", "publish", "register")] == ["success"] * 4

    request = approver.request
    assert request["options"] == ["Approve", "Reject"]
    assert request["subject"].startswith("Publish normal index version ") and "5 images (live: 4)" in request["subject"]
    body = request["body"]
    assert f"replacing the live version `{before}`" in body
    # The counts add up: the unreadable image is neither indexed nor "added".
    assert "| Indexed images | 4 | 5 (+1) |" in body, body
    assert "Indexed images: 4 → 5: 1 added, 0 removed (added: FABR02_OK_900.jpg)." in body, body
    assert "Images: downloaded 6, unreadable 1 (skipped: corrupt_HOL_9999.jpg), indexed 5." in body, body
    assert "**Self-retrieval check: passed** — every one of the 5 images finds itself first" in body, body
    assert approver.response["responded_by"]["name"] == "alice"

    after = live_version(clip["root"], "normal")
    assert after != before and f"version `{after}`" in body  # the version shown is the one published
    assert json.loads((clip["root"] / "normal" / "manifest.json").read_text())["count"] == 5
    row = deployment_row(clip["sql"], result.run_id)
    assert row["status"] == "completed" and row["result_message"].startswith(f"normal index version {after} published")
    approval = row["result_data"]["approval"]
    assert (approval["status"], approval["decision"], approval["by"]) == ("ok", "approved", "alice")
    assert approval["targets"]["normal"]["version"] == after  # it names what it approved, and that went live
    assert approval["targets"]["normal"]["sha256"] == files_sha256(clip["root"] / "normal", skip=("images",))
    assert approval["targets"]["normal"]["sha256"] in body
    assert approval["summary"]["images_before"] == 4 and approval["summary"]["images_after"] == 5
    assert approval["summary"]["self_retrieval"]["found_themselves_first"] == 5
    assert not staging_dirs(clip["releases"])


def test_with_the_storage_run_store_the_approval_names_the_version_publish_stages(clip, airflow_api, monkeypatch):
    """INSPECTION_RUN_STORE=storage: the approval reads the sha256s from the stored version's manifest, publish
    hashes the version it stages on its own worker; they agree, and that version goes live."""
    monkeypatch.setenv("INSPECTION_RUN_STORE", "storage")
    seed_normal(clip["put"], per_product=1)
    with Approver(airflow_api, "clip_index_normal", "alice", "Approve") as approver:
        result = run_dag("clip_index_normal", {"require_approval": True})
    approver.check()
    assert result.state == "success", result.task_states
    named = deployment_row(clip["sql"], result.run_id)["result_data"]["approval"]["targets"]["normal"]
    assert named["version"] == live_version(clip["root"], "normal")
    assert named["sha256"] == files_sha256(clip["root"] / "normal", skip=("images",))


def test_a_rejected_clip_index_is_discarded_and_the_live_one_stays(clip, airflow_api):
    before = first_version_without_approval(clip)
    old_index = (clip["root"] / "normal" / "faiss_index.bin").read_bytes()
    clip["put"]("images/normal/1/BRKT01_OK_901.jpg", jpeg(0, 901))

    with Approver(airflow_api, "clip_index_normal", "bob", "Reject") as approver:
        result = run_dag("clip_index_normal", {"require_approval": True})
    approver.check()
    assert result.state == "failed"
    assert (result.task_states["approve"], result.task_states["publish"], result.task_states["register"]) == (
        "success", "skipped", "failed")
    assert live_version(clip["root"], "normal") == before
    assert (clip["root"] / "normal" / "faiss_index.bin").read_bytes() == old_index
    assert not staging_dirs(clip["releases"])  # the staged version was discarded
    row = deployment_row(clip["sql"], result.run_id)
    assert row["status"] == "failed" and row["completed_at"] is not None
    assert "rejected by bob" in row["result_message"], row["result_message"]
    assert f"The live index is unchanged (version {before})" in row["result_message"]
    assert row["result_data"]["approval"]["decision"] == "rejected" and row["result_data"]["version"] is None


def approved_run_whose_publish_failed(clip, airflow_api, monkeypatch, seq: int):
    """A run with one more image, approved by alice, whose publish keeps failing (the channel refuses every
    upload, through Airflow's retries); returns the run, its staged version and its ClipRun."""
    from inspection_refresh.config import get_settings
    from inspection_refresh.tasks import clip_index as pipeline

    clip["put"](f"images/normal/1/BRKT01_OK_{seq}.jpg", jpeg(0, seq))
    with monkeypatch.context() as patch:
        failing_publishes(patch)
        with Approver(airflow_api, "clip_index_normal", "alice", "Approve") as approver:
            result = run_dag("clip_index_normal", {"require_approval": True})
    approver.check()
    assert result.state == "failed"
    assert [result.task_states[t] for t in ("approve", "publish", "register")] == ["success", "failed", "failed"]
    row = deployment_row(clip["sql"], result.run_id)
    staged = row["result_data"]["staged_version"]
    assert row["result_data"]["approval"]["targets"]["normal"]["version"] == staged
    assert f"The staged version {staged} is kept: clearing publish retries publishing it" in row["result_message"]
    assert len(staging_dirs(clip["releases"])) == 1  # the failed publish kept what index_save built
    run = pipeline.ClipRun(index_type="normal", run_id=result.run_id, prefix="images/normal/",
                           pretrained=get_settings().clip_pretrained)
    return result, staged, run


def test_a_cleared_publish_publishes_the_approved_version_without_a_rebuild(clip, airflow_api, monkeypatch):
    from inspection_refresh.tasks import clip_index as pipeline

    before = first_version_without_approval(clip)
    result, staged, run = approved_run_whose_publish_failed(clip, airflow_api, monkeypatch, 910)
    assert live_version(clip["root"], "normal") == before
    [kept] = staging_dirs(clip["releases"])
    index_inode = (kept / "faiss_index.bin").stat().st_ino

    # The operator clears publish (and register): the kept version is published, nothing is rebuilt.
    assert pipeline.publish(run)["version"] == staged
    outcome = pipeline.register(run)
    assert outcome["status"] == "completed" and outcome["version"] == staged
    assert live_version(clip["root"], "normal") == staged
    assert (clip["root"] / "normal" / "faiss_index.bin").stat().st_ino == index_inode  # the very file index_save wrote
    row = deployment_row(clip["sql"], result.run_id)
    assert row["status"] == "completed" and row["result_message"].startswith(f"normal index version {staged} published")
    assert not staging_dirs(clip["releases"])


def test_a_version_rebuilt_after_the_approval_is_refused(clip, airflow_api, monkeypatch):
    from inspection_refresh.tasks import clip_index as pipeline
    from inspection_refresh.tasks.approval import NotWhatWasApproved

    before = first_version_without_approval(clip)
    old_index = (clip["root"] / "normal" / "faiss_index.bin").read_bytes()
    result, approved, run = approved_run_whose_publish_failed(clip, airflow_api, monkeypatch, 911)

    # The operator clears index_save and publish: index_save stages a new version nobody saw ...
    rebuilt = pipeline.index_save(run)["version"]
    assert rebuilt != approved
    with pytest.raises(NotWhatWasApproved) as refused:  # ... and publish refuses it
        pipeline.publish(run)
    assert str(refused.value).startswith(
        f"normal index version {rebuilt} is not what was approved (approved version {approved}, sha256 ")
    assert f"; now version {rebuilt}, sha256 " in str(refused.value)
    assert live_version(clip["root"], "normal") == before
    assert (clip["root"] / "normal" / "faiss_index.bin").read_bytes() == old_index

    outcome = pipeline.register(run)  # register, cleared with them
    assert outcome["status"] == "failed"
    row = deployment_row(clip["sql"], result.run_id)
    assert row["status"] == "failed"
    message = row["result_message"]
    assert f"normal index version {rebuilt} is not what was approved (approved version {approved}" in message, message
    assert "nothing published; clear the run's approve task to ask again" in message, message
    assert f"The live index is unchanged (version {before})" in message, message
    assert row["result_data"]["approval"]["targets"]["normal"]["version"] == approved


def test_an_unanswered_approval_times_out_and_publishes_nothing(clip, airflow_api, monkeypatch):
    seed_normal(clip["put"], per_product=1)
    monkeypatch.setenv("INSPECTION_APPROVAL_TIMEOUT_MINUTES", "0.05")  # 3 s

    with Approver(airflow_api, "clip_index_normal", "alice", None) as approver:
        result = run_dag("clip_index_normal", {"require_approval": True})
    approver.check()
    assert result.state == "failed"
    assert (result.task_states["approve"], result.task_states["publish"], result.task_states["register"]) == (
        "failed", "upstream_failed", "failed")
    assert live_version(clip["root"], "normal") is None and not staging_dirs(clip["releases"])
    row = deployment_row(clip["sql"], result.run_id)
    assert row["status"] == "failed"
    assert "approval timed out: nobody approved or rejected publishing within 3s" in row["result_message"], \
        row["result_message"]
    assert "none published yet" in row["result_message"]


# ------------------------------------------------------------------------------------------ PatchCore


@pytest.fixture
def patchcore(s3_server, mysql_database, airflow_db, sql, tmp_path, monkeypatch):
    """TEX01 with 8 normal and 3 defect images; EMPTY02 with nothing uploaded (its prepare fails)."""
    products = "(11, 'TEX01', 'Textured panel', 1), (12, 'EMPTY02', 'Nothing uploaded', 1)"
    with patchcore_dag_env("apprpc", products, sql, tmp_path, monkeypatch) as env:
        yield env


def patchcore_row(sql, run_id: str) -> dict:
    rows = sql("SELECT * FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s", (run_id,))
    assert len(rows) == 1
    return {**rows[0], "result_data": json.loads(rows[0]["result_data"])}


def test_one_approval_for_the_patchcore_run_then_a_rejected_rebuild_keeps_the_bank(patchcore, airflow_api):
    from inspection_refresh.publish import Publisher

    publisher = Publisher(patchcore["root"])

    # 1. Both products, one fails at prepare: the one approval lists it and still publishes the other.
    with Approver(airflow_api, "patchcore_memory_bank", "alice", "Approve") as approver:
        first = run_dag("patchcore_memory_bank", {"shorter": 128, "require_approval": True})
    approver.check()
    states = first.task_states
    assert states["product.prepare[1]"] == "failed" and states["approve"] == "success"
    assert states["product.publish[0]"] == "success" and states["product.publish[1]"] == "upstream_failed"
    body = approver.request["body"]
    assert approver.request["subject"] == "Publish PatchCore banks of TEX01 (1 other product(s) failed)"
    assert "**Failed (1)**" in body and "- EMPTY02 at download: " in body and "no normal images" in body, body
    tex_row = next(line for line in body.splitlines() if line.startswith("| TEX01 |"))
    assert tex_row.startswith("| TEX01 | none | 8 |"), tex_row  # nothing live yet: only the new numbers
    version = publisher.current("TEX01")
    assert version is not None and publisher.current("EMPTY02") is None
    row = patchcore_row(patchcore["sql"], first.run_id)
    assert row["status"] == "failed"  # EMPTY02 failed
    assert "Published: TEX01" in row["result_message"] and "EMPTY02 at download" in row["result_message"]
    assert row["result_data"]["approval"]["by"] == "alice"
    assert set(row["result_data"]["approval"]["summary"]["failed"]) == {"EMPTY02"}

    # 2. TEX01 alone with another short side: the live bank's numbers beside the new ones; rejected.
    live_tau = json.loads((patchcore["root"] / "TEX01" / "tau.json").read_text())
    with Approver(airflow_api, "patchcore_memory_bank", "bob", "Reject") as approver:
        second = run_dag("patchcore_memory_bank", {"products": ["TEX01"], "shorter": 96, "require_approval": True})
    approver.check()
    assert second.state == "failed"
    assert second.task_states["product.build[0]"] == "success" and second.task_states["approve"] == "success"
    # Skipped by the rejection (before or after Airflow expanded the mapped task).
    assert [state for task, state in second.task_states.items() if task.startswith("product.publish")] == ["skipped"]
    tex_row = next(line for line in approver.request["body"].splitlines() if line.startswith("| TEX01 |"))
    cells = [cell.strip() for cell in tex_row.strip("|").split("|")]
    assert cells[:3] == ["TEX01", version, "8 → 8"], cells
    assert all(" → " in cell for cell in cells[3:]), cells  # bank size, AUROC, tau image, tau pixel
    assert cells[5].startswith(f"{live_tau['image']:.4f} → ") and cells[6].startswith(f"{live_tau['pixel']:.4f} → ")
    assert publisher.current("TEX01") == version  # the live bank stays
    assert json.loads((patchcore["root"] / "TEX01" / "tau.json").read_text()) == live_tau
    assert not staging_dirs(patchcore["releases"])  # the new bank was discarded
    row = patchcore_row(patchcore["sql"], second.run_id)
    assert row["status"] == "failed"
    assert row["result_message"].startswith("Not published (rejected by bob): TEX01 keeps the live bank"), \
        row["result_message"]
    assert row["result_data"]["products"]["TEX01"]["stage"] == "approve"
    assert os.listdir(patchcore["root"]) == ["TEX01"]


def test_a_failed_patchcore_publish_keeps_the_approved_bank_for_a_cleared_publish(patchcore, airflow_api, monkeypatch):
    """The channel refuses TEX01's upload once: the built bank stays, and clearing publish publishes that very bank
    (the approved one) without building again."""
    from inspection_refresh.publish import Publisher
    from inspection_refresh.tasks import patchcore as pipeline

    refused = failing_publishes(monkeypatch, times=1)
    with Approver(airflow_api, "patchcore_memory_bank", "alice", "Approve") as approver:
        result = run_dag("patchcore_memory_bank", {"products": ["TEX01"], "shorter": 96, "require_approval": True})
    approver.check()
    assert refused == ["TEX01"] and result.state == "failed"
    assert (result.task_states["product.build[0]"], result.task_states["approve"],
            result.task_states["product.publish[0]"]) == ("success", "success", "failed")
    row = patchcore_row(patchcore["sql"], result.run_id)
    assert row["status"] == "failed" and Publisher(patchcore["root"]).current("TEX01") is None
    assert "simulated: the release channel refused the upload of TEX01" in row["result_message"]
    assert "the built bank is kept: clearing publish retries publishing it without a rebuild" in row["result_message"]
    approved = row["result_data"]["approval"]["targets"]["TEX01"]
    [kept] = staging_dirs(patchcore["releases"])  # not discarded by the failed publish or by register
    assert approved["version"] is None and approved["sha256"] == files_sha256(kept, skip=("ok",))
    run = pipeline.PatchcoreRun(run_id=result.run_id, products=("TEX01",), shorter=96,
                                weights=pipeline.get_settings().patchcore_weights)
    bank_inode, build_log = (kept / "memory_bank.pt").stat().st_ino, pipeline.read_build_log(run, "TEX01")

    # The operator clears publish (and register): the kept bank is checked against the approval and published.
    [product] = run.store.read_json("products.json")["products"]
    published = pipeline.publish_product(run, product)
    assert pipeline.read_build_log(run, "TEX01") == build_log  # the build did not run again
    assert pipeline.register(run)["status"] == "completed"
    live = patchcore["root"] / "TEX01"
    assert Publisher(patchcore["root"]).current("TEX01") == published["version"]
    assert (live / "memory_bank.pt").stat().st_ino == bank_inode  # the bank that was built and approved
    assert files_sha256(live, skip=("ok",)) == approved["sha256"] and len(list((live / "ok").glob("*.jpg"))) == 8
    assert patchcore_row(patchcore["sql"], result.run_id)["status"] == "completed"
    assert not staging_dirs(patchcore["releases"])
