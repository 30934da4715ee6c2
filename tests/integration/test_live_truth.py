"""One truth for what is live, on every host: changes of an artefact that race each other across hosts.

Two Airflow "hosts" (each its own index root and cache) share one release channel on the real S3 server
(``INSPECTION_PUBLISH_TARGETS=channel``) and one real MariaDB, whose named lock serialises every change.
The CLIP run's real ``publish`` and ``register`` task functions and the rollback DAG's ``roll_back`` and
``register`` run against them (the stages before ``publish`` are recorded by hand: a small staged version
stands in for a built index). Each interleaving ends with the channel's pointer, the hosts' live links,
the pin and the ``deployment_logs`` rows in agreement; then a serving host with a stale pin follows
``current.json``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from inspection_refresh import compose
from inspection_refresh.cli import main
from inspection_refresh.config import Settings, default_releases_dir, get_settings
from inspection_refresh.publish import PIN_FILE, Publisher, new_version_id
from inspection_refresh.tasks import approval
from inspection_refresh.tasks import rollback as rollback_task
from inspection_refresh.tasks.clip_index import publishing
from inspection_refresh.tasks.clip_index.run import ClipRun
from inspection_refresh.tasks.stages import StageRecorder

from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

PREFIX = "deployments/"
FILES = 6


@pytest.fixture
def channel_env(storage, s3_server, mysql_database, tmp_path, monkeypatch):
    """Channel mode in a fresh bucket; hosts get their own roots from :func:`host`."""
    monkeypatch.setenv("INSPECTION_PUBLISH_TARGETS", "channel")
    monkeypatch.setenv("INSPECTION_CHANNEL_BUCKET", storage.bucket)
    monkeypatch.setenv("INSPECTION_CHANNEL_PREFIX", PREFIX)
    monkeypatch.setenv("INSPECTION_KEEP_VERSIONS", "5")
    monkeypatch.setenv("INSPECTION_RUN_STORE", "local")
    monkeypatch.delenv("INSPECTION_CHANNEL_CONN_ID", raising=False)
    monkeypatch.delenv("INSPECTION_SIGNING_CONN_ID", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    return {"storage": storage, "server": s3_server, "tmp": tmp_path}


def host(channel_env: dict[str, Any], label: str) -> Settings:
    """The settings of one Airflow worker: its own index root, releases and cache, the shared channel and DB."""
    root = channel_env["tmp"] / label / "clip_index"
    return replace(get_settings(), index_root=root, index_releases=default_releases_dir(root),
                   cache_root=channel_env["tmp"] / label / "cache")


def staged_run(settings: Settings, run_id: str, seed: int, *, scheduled: bool = False) -> tuple[ClipRun, str]:
    """A CLIP run of ``normal`` on ``settings``' host whose ``index_save`` staged a version (approved, or
    not asking): what ``publish`` finds when it starts."""
    run = ClipRun("normal", run_id, "images/normal/", scheduled=scheduled,
                  deployed_by="airflow-scheduler" if scheduled else "airflow:bob", settings=settings)
    staging = run.publisher.stage("normal")
    version = new_version_id()
    for i in range(FILES):
        (staging / f"part-{i}.bin").write_bytes(bytes([seed, i]) * (3000 + i))
    facts = {"download": {}, "embed": {"embedded": FILES, "cached": 0, "embedding_dim": 4},
             "index_save": {"version": version, "staging": str(staging), "count": FILES, "dim": 4, "verified": True}}
    for stage, stage_facts in facts.items():
        recorder = StageRecorder(run.store, stage)
        recorder.facts = stage_facts
        recorder.save("ok")
    approval.record_decision(run.store, approval.APPROVED, required=False)
    return run, version


def publish_and_register(run: ClipRun) -> dict[str, Any]:
    """The run's ``publish`` task (its error kept, as Airflow would log it) and then its ``register``."""
    try:
        publishing.publish(run)
    except Exception as exc:  # register records what the failed task left
        run.store.write_json("test-publish-error.json", {"type": type(exc).__name__, "message": str(exc)})
    return publishing.register(run)


def roll_back(settings: Settings, run_id: str, *, version: str = "previous", unpin: bool = False) -> dict[str, Any]:
    """The ``deployment_rollback`` DAG's two tasks on ``settings``' host."""
    run = rollback_task.RollbackRun(run_id, "clip:normal", version=version, unpin=unpin,
                                    deployed_by="airflow:alice", settings=settings)
    try:
        rollback_task.roll_back(run)
    except Exception:  # recorded in its stage record; register writes the row
        pass
    return rollback_task.register(run)


def pointer(channel_env: dict[str, Any]) -> str | None:
    storage = channel_env["storage"]
    try:
        body = storage.client.get_object(Bucket=storage.bucket, Key=f"{PREFIX}clip/normal/current.json")["Body"]
    except storage.client.exceptions.NoSuchKey:
        return None
    return json.loads(body.read())["version"]


def channel_pin(channel_env: dict[str, Any]) -> dict[str, Any] | None:
    storage = channel_env["storage"]
    try:
        body = storage.client.get_object(Bucket=storage.bucket, Key=f"{PREFIX}clip/normal/pin.json")["Body"]
    except storage.client.exceptions.NoSuchKey:
        return None
    return json.loads(body.read())


def link(settings: Settings) -> str | None:
    """The version this host's live link points to."""
    live = settings.index_root / "normal"
    return Path(live.readlink()).name if live.is_symlink() else None


def row(sql, dag_id: str, run_id: str) -> dict[str, Any]:
    rows = sql("SELECT status, result_message, result_data FROM deployment_logs WHERE "
               "JSON_UNQUOTE(JSON_EXTRACT(result_data, '$.airflow_dag_id')) = %s AND "
               "JSON_UNQUOTE(JSON_EXTRACT(result_data, '$.airflow_run_id')) = %s", (dag_id, run_id))
    assert len(rows) == 1, rows
    return {**rows[0], "result_data": json.loads(rows[0]["result_data"])}


def no_local_pins(*hosts: Settings) -> bool:
    return not any((h.index_releases / "normal" / PIN_FILE).exists() for h in hosts)


def wait_for_upload_to_start(channel_env: dict[str, Any], version: str, seconds: float = 30) -> None:
    """Until the first object of ``version`` is in the channel (the others are still held by the emulator)."""
    deadline = time.monotonic() + seconds
    while not channel_env["storage"].list_objects(f"{PREFIX}clip/normal/{version}/"):
        assert time.monotonic() < deadline, f"the upload of {version} never started"
        time.sleep(0.05)


def test_a_rollback_while_a_publish_uploads_wins_and_the_publish_publishes_nothing(channel_env, sql):
    worker_a, worker_b = host(channel_env, "worker-a"), host(channel_env, "worker-b")
    first, v1 = staged_run(worker_a, "manual__1", seed=1)
    assert publish_and_register(first)["status"] == "completed"
    second, v2 = staged_run(worker_a, "manual__2", seed=2)  # (staging removes what earlier runs left staged)
    assert publish_and_register(second)["status"] == "completed"
    assert pointer(channel_env) == v2 == link(worker_a)

    # A manual run (it would replace a pin) uploads slowly on worker A; meanwhile an operator rolls back
    # on worker B, which keeps no version at all (it fetches v1 from the channel).
    third, v3 = staged_run(worker_a, "manual__3", seed=3)
    outcome: dict[str, Any] = {}
    with channel_env["server"].faults(slow_upload={f"{PREFIX}clip/normal/{v3}/": 1.5}):
        thread = threading.Thread(target=lambda: outcome.update(publish_and_register(third)))
        thread.start()
        wait_for_upload_to_start(channel_env, v3)
        rolled = roll_back(worker_b, "manual__rollback")
        assert thread.is_alive(), "the publish finished before the rollback: no race was tested"
        thread.join(60)
    assert rolled["status"] == "completed" and rolled["to_version"] == v1, rolled
    error = third.store.read_json("test-publish-error.json") if third.store.exists("test-publish-error.json") else {}
    assert outcome["status"] == "failed", (outcome, error)

    # All four agree: the pointer, every host's link, the pin, the rows.
    assert pointer(channel_env) == v1 == link(worker_b) == link(worker_a)
    pin = channel_pin(channel_env)
    assert pin["version"] == v1 and pin["pinned_by"] == "airflow:alice"
    assert no_local_pins(worker_a, worker_b)
    lost = row(sql, "clip_index_normal", "manual__3")
    assert lost["status"] == "failed"
    assert lost["result_message"] == (f"normal index version {v3}: rolled back to {v1} by airflow:alice while this "
                                      "run was uploading; nothing published"), lost
    rollback_row = row(sql, rollback_task.ROLLBACK_DAG_ID, "manual__rollback")
    assert rollback_row["status"] == "completed" and f"to {v1}" in rollback_row["result_message"]
    assert row(sql, "clip_index_normal", "manual__2")["status"] == "completed"
    # The uploaded version stays in the channel as a kept, non-current version (rolled forward to, or pruned).
    assert v3 in compose.index_publisher(worker_a).channel.versions("normal")
    assert v3 not in compose.index_publisher(worker_a).versions("normal")


def test_two_hosts_publishing_one_artefact_at_once_end_on_the_newer_version(channel_env, sql):
    worker_a, worker_b = host(channel_env, "worker-a"), host(channel_env, "worker-b")
    base, v0 = staged_run(worker_a, "scheduled__0", seed=9, scheduled=True)
    assert publish_and_register(base)["status"] == "completed"
    older, va = staged_run(worker_a, "scheduled__a", seed=10, scheduled=True)
    newer, vb = staged_run(worker_b, "manual__b", seed=11)
    assert va < vb
    outcomes: dict[str, dict[str, Any]] = {}
    # Worker A's (older) version uploads slowly, so worker B's newer one goes live while A still uploads.
    with channel_env["server"].faults(slow_upload={f"{PREFIX}clip/normal/{va}/": 0.5}):
        threads = [threading.Thread(target=lambda r=r, k=k: outcomes.update({k: publish_and_register(r)}))
                   for k, r in (("a", older), ("b", newer))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert outcomes["b"]["status"] == "completed" and outcomes["a"]["status"] == "failed", outcomes

    assert pointer(channel_env) == vb == link(worker_b) == link(worker_a)  # A's working copy follows the channel
    assert channel_pin(channel_env) is None and no_local_pins(worker_a, worker_b)
    assert row(sql, "clip_index_normal", "manual__b")["status"] == "completed"
    lost = row(sql, "clip_index_normal", "scheduled__a")
    assert lost["status"] == "failed"
    assert lost["result_message"].startswith(f"normal index version {va}: version {vb} of 'normal', newer than {va}, "
                                             "went live"), lost
    assert lost["result_message"].endswith("while this run was uploading; nothing published")


def test_an_unpin_on_one_worker_lets_a_scheduled_run_on_another_publish(channel_env, sql):
    worker_a, worker_b = host(channel_env, "worker-a"), host(channel_env, "worker-b")
    for n in (1, 2):
        run, _ = staged_run(worker_a, f"manual__{n}", seed=n)
        assert publish_and_register(run)["status"] == "completed"
    rolled = roll_back(worker_a, "manual__rollback")
    v1 = rolled["to_version"]
    # Worker B once had a pin of its own (older code kept one per host): it must not count any more.
    stale = worker_b.index_releases / "normal" / PIN_FILE
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"version": "20200101T000000000000Z", "pinned_by": "someone", "pinned_at": "then"}))

    refused, _ = staged_run(worker_b, "scheduled__1", seed=3, scheduled=True)
    assert publish_and_register(refused)["status"] == "failed"  # pinned (the channel's pin, worker A's rollback)
    assert "is pinned to version " + v1 in row(sql, "clip_index_normal", "scheduled__1")["result_message"]

    assert roll_back(worker_a, "manual__unpin", unpin=True)["status"] == "completed"
    assert channel_pin(channel_env) is None
    scheduled, v3 = staged_run(worker_b, "scheduled__2", seed=4, scheduled=True)
    assert publish_and_register(scheduled)["status"] == "completed"

    assert pointer(channel_env) == v3 == link(worker_b)
    assert channel_pin(channel_env) is None and no_local_pins(worker_a, worker_b)  # the stale one went with the change
    assert compose.index_publisher(worker_a).pinned("normal") is None  # every host sees the one pin: none
    assert row(sql, rollback_task.ROLLBACK_DAG_ID, "manual__unpin")["status"] == "completed"
    assert row(sql, "clip_index_normal", "scheduled__2")["result_data"]["version"] == v3


def test_a_publish_that_failed_after_the_swap_is_recorded_live_and_a_retry_completes(channel_env, sql, monkeypatch):
    worker = host(channel_env, "worker")
    run, version = staged_run(worker, "manual__1", seed=1)
    original = type(run.publisher)._prune

    def time_out_after_the_swap(publisher, name):  # the task's timeout strikes right after the swap
        original(publisher, name)
        raise TimeoutError("Task timed out after 600s")

    monkeypatch.setattr(type(run.publisher), "_prune", time_out_after_the_swap)
    with pytest.raises(TimeoutError):
        publishing.publish(run)
    monkeypatch.setattr(type(run.publisher), "_prune", original)
    assert pointer(channel_env) == version == link(worker)

    # Airflow retries publish: it completes (the version is live), and the row says so.
    publishing.publish(run)
    outcome = publishing.register(run)
    assert outcome["status"] == "completed" and outcome["version"] == version
    recorded = row(sql, "clip_index_normal", "manual__1")
    assert recorded["status"] == "completed" and f"version {version} published" in recorded["result_message"]

    # Without the retry (its tries used up), register still reports the new version as live.
    second, v2 = staged_run(worker, "manual__2", seed=2)
    monkeypatch.setattr(type(second.publisher), "_prune", time_out_after_the_swap)
    with pytest.raises(TimeoutError):
        publishing.publish(second)
    monkeypatch.setattr(type(second.publisher), "_prune", original)
    outcome = publishing.register(second)
    recorded = row(sql, "clip_index_normal", "manual__2")
    assert outcome["status"] == "completed" and recorded["result_data"]["version"] == v2 == pointer(channel_env)
    assert "It is live; the publish task failed after the swap: TimeoutError" in recorded["result_message"]
    assert "unchanged" not in recorded["result_message"]


def test_a_serving_host_with_a_stale_pin_follows_current_json(channel_env):
    worker = host(channel_env, "worker")
    versions = []
    for n in (1, 2):
        run, version = staged_run(worker, f"manual__{n}", seed=n)
        publishing.publish(run)
        versions.append(version)
    node = channel_env["tmp"] / "node"
    pin = node / "clip_index.releases" / "normal" / PIN_FILE
    pin.parent.mkdir(parents=True)
    pin.write_text(json.dumps({"version": versions[0], "pinned_by": "cli:root", "pinned_at": "earlier"}))
    storage = channel_env["storage"]

    def pull() -> int:
        return main(["pull", "--endpoint-url", channel_env["server"].endpoint, "--region", "kr-standard",
                     "--bucket", storage.bucket, "--index-root", str(node / "clip_index"),
                     "--patchcore-root", str(node / "patchCore"), "--artefact", "clip:normal"])

    assert pull() == 0  # not refused because of the pin
    assert Path((node / "clip_index" / "normal").readlink()).name == versions[1]
    assert not pin.exists()  # and none is left there
    # The channel rolls back (pinned there): the node follows current.json to the kept version, and keeps no pin.
    compose.index_publisher(worker).rollback("normal", versions[0], pinned_by="airflow:alice")
    pin.write_text(json.dumps({"version": versions[1], "pinned_by": "cli:root", "pinned_at": "later"}))
    assert pull() == 0
    assert Path((node / "clip_index" / "normal").readlink()).name == versions[0]
    assert not pin.exists()


def test_a_rollback_during_a_prune_waits_and_never_points_at_a_removed_version(channel_env, sql, monkeypatch):
    from inspection_refresh.channel import ReleaseChannel

    monkeypatch.setenv("INSPECTION_KEEP_VERSIONS", "2")
    worker_a, worker_b = host(channel_env, "worker-a"), host(channel_env, "worker-b")
    versions = []
    for n in (1, 2, 3):
        run, version = staged_run(worker_a, f"manual__{n}", seed=n)
        assert publish_and_register(run)["status"] == "completed"
        versions.append(version)
    assert compose.index_publisher(worker_a).channel.versions("normal") == versions[1:]

    # The next publish prunes versions[1], but only once an operator on worker B, rolling back to it meanwhile,
    # has fetched its own copy (events, not sleeps: the order must not depend on the machine's load).
    pruning, fetched = threading.Event(), threading.Event()
    remove, fetch = ReleaseChannel._remove_version, Publisher._fetch

    def slow_remove(channel, name, version, **options):
        pruning.set()
        fetched.wait(30)
        remove(channel, name, version, **options)

    def fetch_then_signal(publisher, name, version):
        try:
            return fetch(publisher, name, version)
        finally:
            fetched.set()

    monkeypatch.setattr(ReleaseChannel, "_remove_version", slow_remove)
    monkeypatch.setattr(Publisher, "_fetch", fetch_then_signal)
    fourth, v4 = staged_run(worker_a, "manual__4", seed=4)
    thread = threading.Thread(target=publish_and_register, args=(fourth,))
    thread.start()
    assert pruning.wait(30)
    rolled = roll_back(worker_b, "manual__rollback", version=versions[1])  # waits for the prune's lock
    thread.join(60)

    # The pointer names a complete version (the rollback put it back from worker B's copy), the pin the same.
    channel = compose.index_publisher(worker_a).channel
    assert rolled["status"] == "completed" and pointer(channel_env) == versions[1] == link(worker_b)
    assert versions[1] in channel.versions("normal") and channel.manifest("normal", versions[1]) is not None
    assert channel_pin(channel_env)["version"] == versions[1]
    assert row(sql, "clip_index_normal", "manual__4")["status"] == "completed"
    assert row(sql, rollback_task.ROLLBACK_DAG_ID, "manual__rollback")["status"] == "completed"
