"""The storage layer against a real S3 server over HTTP that behaves like NCP."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request

import pytest
from botocore.exceptions import ClientError
from inspection_refresh import compose
from inspection_refresh.storage import (
    SYNC_STATE_FILE,
    ObjectStorage,
    StorageError,
    UnsafeKeyError,
    local_path_for_key,
    require_complete,
)

from tests.conftest import storage_connection


def put(storage: ObjectStorage, key: str, body: bytes) -> None:
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=body)


def test_every_operation_round_trips(storage, tmp_path):
    source = tmp_path / "a.jpg"
    source.write_bytes(b"\xff\xd8" + os.urandom(5000))

    assert storage.create_folder("images/normal/7") == "images/normal/7/"
    storage.upload_file(source, "images/normal/7/a.jpg", content_type="image/jpeg")

    listed = {o.key: o for o in storage.list_objects("images/", include_folders=True)}
    assert set(listed) == {"images/normal/7/", "images/normal/7/a.jpg"}
    assert listed["images/normal/7/"].is_folder_marker and listed["images/normal/7/"].size == 0
    assert [o.key for o in storage.list_objects("images/")] == ["images/normal/7/a.jpg"]

    target = tmp_path / "out" / "a.jpg"
    assert storage.download_file("images/normal/7/a.jpg", target) == 5002
    assert target.read_bytes() == source.read_bytes()

    with urllib.request.urlopen(storage.get_url("images/normal/7/a.jpg", expires_in=60)) as response:
        assert response.read() == source.read_bytes()
    assert storage.storage_url("images/normal/7/a.jpg").endswith(f"/{storage.bucket}/images/normal/7/a.jpg")

    storage.delete_file("images/normal/7/a.jpg")
    assert [o.key for o in storage.list_objects("images/")] == []


def test_listing_pages_with_v1_markers_on_a_server_that_refuses_v2(storage):
    keys = [f"images/normal/1/{i:03d}.jpg" for i in range(7)]
    for key in keys:
        put(storage, key, b"x")
    with pytest.raises(ClientError, match="NotImplemented"):
        storage.client.list_objects_v2(Bucket=storage.bucket)  # what boto3/S3Hook defaults to
    assert [o.key for o in storage.list_objects("images/", page_size=2)] == keys


def test_client_defaults_are_ncp_safe_and_overridable(s3_server, monkeypatch):
    client = compose.object_storage().client
    assert client.meta.config.request_checksum_calculation == "when_required"
    assert client.meta.config.response_checksum_validation == "when_required"
    assert client.meta.config.s3["addressing_style"] == "path"

    import json
    conn = json.loads(storage_connection(s3_server.endpoint))
    conn["extra"]["config_kwargs"] = {"s3": {"addressing_style": "virtual"}}
    monkeypatch.setenv("AIRFLOW_CONN_CUSTOM_STORAGE", json.dumps(conn))
    custom = compose.object_storage("custom_storage").client
    assert custom.meta.config.s3["addressing_style"] == "virtual"
    assert custom.meta.config.request_checksum_calculation == "when_required"


def test_sync_downloads_then_skips_unchanged_and_follows_changes(storage, tmp_path):
    for i in range(5):
        put(storage, f"images/normal/1/{i}.jpg", os.urandom(20_000))
    local = tmp_path / "mirror"

    first = storage.sync_prefix("images/normal/", local)
    assert (first.downloaded, first.unchanged, first.deleted) == (5, 0, 0)
    assert sorted(p.name for p in (local / "1").iterdir()) == [f"{i}.jpg" for i in range(5)]

    second = storage.sync_prefix("images/normal/", local)
    assert (second.downloaded, second.unchanged) == (0, 5)

    new_body = os.urandom(30_000)
    put(storage, "images/normal/1/2.jpg", new_body)  # changed: new ETag and size
    storage.delete_file("images/normal/1/4.jpg")  # gone upstream
    third = storage.sync_prefix("images/normal/", local)
    assert (third.downloaded, third.unchanged, third.deleted) == (1, 3, 1)
    assert (local / "1" / "2.jpg").read_bytes() == new_body
    assert not (local / "1" / "4.jpg").exists()
    assert set(third.files) == {f"images/normal/1/{i}.jpg" for i in range(4)}


def test_sync_redownloads_a_locally_damaged_file(storage, tmp_path):
    body = os.urandom(10_000)
    put(storage, "images/normal/1/a.jpg", body)
    local = tmp_path / "mirror"
    storage.sync_prefix("images/normal/", local)
    (local / "1" / "a.jpg").write_bytes(body[:10])
    again = storage.sync_prefix("images/normal/", local)
    assert again.downloaded == 1 and (local / "1" / "a.jpg").read_bytes() == body


def test_sync_retries_a_connection_cut_mid_body(storage, s3_server, tmp_path, caplog):
    body = os.urandom(200_000)
    put(storage, "images/normal/1/flaky.jpg", body)
    put(storage, "images/normal/1/fine.jpg", b"ok" * 100)
    s3_server.set_faults(cut_body={"flaky.jpg": 2})
    try:
        with caplog.at_level(logging.WARNING, logger="inspection_refresh.storage"):
            result = storage.sync_prefix("images/normal/", tmp_path / "mirror")
    finally:
        s3_server.set_faults(cut_body={})
    assert result.failed == [] and result.downloaded == 2
    assert (tmp_path / "mirror" / "1" / "flaky.jpg").read_bytes() == body
    assert sum("Retrying images/normal/1/flaky.jpg" in r.getMessage() for r in caplog.records) == 2


def test_a_download_that_keeps_failing_leaves_no_half_file(storage, s3_server, tmp_path):
    put(storage, "images/normal/1/broken.jpg", os.urandom(100_000))
    s3_server.set_faults(cut_body={"broken.jpg": 100})
    try:
        result = storage.sync_prefix("images/normal/", tmp_path / "mirror")
    finally:
        s3_server.set_faults(cut_body={})
    assert [key for key, _ in result.failed] == ["images/normal/1/broken.jpg"]
    assert "100000" in result.failed[0][1]
    leftovers = [p.name for p in (tmp_path / "mirror").rglob("*") if p.is_file()]
    assert leftovers == [SYNC_STATE_FILE]  # neither broken.jpg nor a .partial file


def test_sync_refuses_keys_escaping_the_target_and_skips_rejected_objects(storage, tmp_path, caplog):
    put(storage, "images/normal/1/good.jpg", b"g")
    put(storage, "images/normal/1/../../../escape.jpg", b"evil")
    put(storage, "images/normal//abs.jpg", b"evil")
    put(storage, "images/normal/1/notes.txt", b"text")
    storage.create_folder("images/normal/1")
    with caplog.at_level(logging.WARNING, logger="inspection_refresh.storage"):
        result = storage.sync_prefix(
            "images/normal/", tmp_path / "mirror",
            accept=lambda o: "not an image" if o.key.endswith(".txt") else None)
    assert set(result.files) == {"images/normal/1/good.jpg"}
    skipped = dict(result.skipped)
    assert "outside" in skipped["images/normal/1/../../../escape.jpg"]
    assert "outside" in skipped["images/normal//abs.jpg"]
    assert skipped["images/normal/1/notes.txt"] == "not an image"
    assert not (tmp_path / "escape.jpg").exists()
    assert any("Skipping images/normal/1/../../../escape.jpg" in r.getMessage() for r in caplog.records)


def test_random_faults_hit_only_object_gets_and_the_sync_rides_them_out(storage, s3_server, tmp_path, caplog):
    bodies = {f"images/normal/1/{i:02d}.jpg": os.urandom(30_000) for i in range(30)}
    for key, body in bodies.items():
        put(storage, key, body)
    with s3_server.faults(slowdown_rate=0.1, cut_rate=0.1, always_fail=["1/00.jpg"], seed=3):
        assert [o.key for o in storage.list_objects("images/", page_size=7)] == sorted(bodies)  # listing unaffected
        head = storage.client.head_object(Bucket=storage.bucket, Key="images/normal/1/00.jpg")  # HEAD too
        assert head["ContentLength"] == 30_000
        with caplog.at_level(logging.WARNING, logger="inspection_refresh.storage"):
            result = storage.sync_prefix("images/normal/", tmp_path / "mirror")
    assert [key for key, _ in result.failed] == ["images/normal/1/00.jpg"]
    assert any("Retrying images/normal/1/" in r.getMessage() and "/00.jpg" not in r.getMessage()
               for r in caplog.records), "the seeded faults should have cut some downloads"
    for key, body in bodies.items():
        if key != "images/normal/1/00.jpg":
            assert (tmp_path / "mirror" / key.removeprefix("images/normal/")).read_bytes() == body


def test_a_failed_redownload_removes_the_stale_copy_and_the_next_sync_fetches_only_it(storage, s3_server, tmp_path):
    for name in ("a", "b", "c"):
        put(storage, f"images/normal/1/{name}.jpg", os.urandom(10_000))
    local = tmp_path / "mirror"
    storage.sync_prefix("images/normal/", local)
    new_body = os.urandom(12_000)
    put(storage, "images/normal/1/b.jpg", new_body)  # changed upstream, and now it cannot be downloaded
    with s3_server.faults(always_fail=["1/b.jpg"]):
        partial = storage.sync_prefix("images/normal/", local)
    assert [key for key, _ in partial.failed] == ["images/normal/1/b.jpg"]
    assert not (local / "1" / "b.jpg").exists()  # the old version must not pass for the current one
    assert set(partial.files) == {"images/normal/1/a.jpg", "images/normal/1/c.jpg"}
    with pytest.raises(StorageError, match="images/normal/1/b.jpg") as info:
        require_complete(partial)
    assert info.value.transient
    assert require_complete(partial, allowed_missing=1) == ["images/normal/1/b.jpg"]

    retried = storage.sync_prefix("images/normal/", local)  # what the task's retry does
    assert (retried.downloaded, retried.unchanged, retried.failed) == (1, 2, [])
    assert (local / "1" / "b.jpg").read_bytes() == new_body


def test_a_task_timeout_during_a_sync_cancels_the_queued_downloads(storage, s3_server, tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowTaskTimeout
    from airflow.sdk.execution_time.timeout import (
        timeout,  # what runs a task's execution_timeout
    )

    for i in range(20):
        put(storage, f"images/normal/1/{i:02d}.jpg", os.urandom(1_000))
    listing = list(storage.list_objects("images/normal/"))
    started: list[str] = []
    download_once = ObjectStorage._download_once

    def recording(self, key, *args, **kwargs):
        started.append(key)
        return download_once(self, key, *args, **kwargs)

    monkeypatch.setattr(ObjectStorage, "_download_once", recording)
    slow = compose.object_storage(bucket=storage.bucket, max_transfers=2)
    slow.client  # connect before the clock starts
    with s3_server.faults(latency_ms=500):  # 20 objects, 2 at a time: the whole sync would take 5 s
        began = time.monotonic()
        with pytest.raises(AirflowTaskTimeout), timeout(1):
            slow.sync_prefix("images/normal/", tmp_path / "mirror", objects=listing)
        assert time.monotonic() - began < 2.0
        time.sleep(1.5)  # long enough for queued transfers to start, had they not been cancelled
    assert len(started) <= 6, started
    state = json.loads((tmp_path / "mirror" / SYNC_STATE_FILE).read_text())
    assert set(state) <= set(started)  # what did arrive is remembered, so the task's retry skips it


@pytest.mark.parametrize("key", [
    "p/../x.jpg", "p/a/../../x.jpg", "p//x.jpg", "p/./x.jpg", "p/C:/x.jpg", "p/a\\..\\x.jpg", "p/\x00.jpg", "p/",
    "other/x.jpg",
])
def test_unsafe_keys_are_refused(key, tmp_path):
    with pytest.raises(UnsafeKeyError):
        local_path_for_key(key, "p/", tmp_path)


def test_safe_key_maps_inside_target(tmp_path):
    assert local_path_for_key("p/1/a b.jpg", "p/", tmp_path) == tmp_path / "1" / "a b.jpg"


def test_sync_logs_progress_lines_not_one_line_per_file(storage, tmp_path, caplog):
    for i in range(30):
        put(storage, f"images/normal/1/{i}.jpg", os.urandom(5_000))
    with caplog.at_level(logging.INFO, logger="inspection_refresh"):
        storage.sync_prefix("images/normal/", tmp_path / "mirror", progress_interval=0)
    lines = [r.getMessage() for r in caplog.records]
    final = [line for line in lines if line.startswith("Downloading images/normal/: 30/30 files")]
    assert final and "MB/s" in final[-1]
    assert len(lines) < 40


def test_missing_bucket_fails_with_a_clear_message(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as info:
        compose.object_storage(bucket="no-such-bucket").check_access()
    assert not info.value.transient


def test_wrong_credentials_fail_with_a_clear_message(s3_server, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_WRONG_KEYS", storage_connection(s3_server.endpoint, access_key="wrong"))
    with pytest.raises(StorageError, match="rejected the credentials.*connection 'wrong_keys'") as info:
        list(compose.object_storage("wrong_keys").list_objects("images/"))
    assert "test-secret-key" not in str(info.value)
