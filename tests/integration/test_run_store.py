"""The run store, both backends: the local work directory and object storage on the real S3 server."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from datetime import date

import pytest
from inspection_refresh import compose
from inspection_refresh.config import get_settings
from inspection_refresh.runstore import (
    DIR_MANIFEST,
    RunFileMissing,
    RunStore,
    RunStoreError,
    UnsafeNameError,
    materialise_images,
)
from inspection_refresh.storage import UnsafeKeyError
from inspection_refresh.tasks.stages import read_stages, record_stage

RUN_ID = "manual__2026-11-28T02:00:00.123456+00:00"


@pytest.fixture(params=["local", "storage"])
def open_store(request, tmp_path):
    """``open_store(run_id, pipeline="clip")``: a store of the parametrised backend (a fresh bucket for storage)."""
    settings = dataclasses.replace(get_settings(), run_store=request.param, cache_root=tmp_path / "cache")
    storage = request.getfixturevalue("storage") if request.param == "storage" else None

    def open_store(run_id: str = RUN_ID, pipeline: str = "clip", **changes) -> RunStore:
        return compose.run_store(pipeline, run_id, dataclasses.replace(settings, **changes), storage=storage)

    open_store.backend = request.param
    open_store.storage = storage
    return open_store


def make_tree(root, files: dict[str, bytes]):
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    return root


def read_tree(root) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_json_and_files_round_trip_within_their_run_only(open_store, tmp_path):
    store, other = open_store(), open_store("manual__another")
    assert store.backend == open_store.backend
    record = {"images": [{"key": "images/normal/1/불량_01.jpg", "etag": "abc"}], "day": date(2026, 11, 28)}
    store.write_json("inventory.json", record)
    store.write_json("BRKT01/stage-download.json", {"status": "ok"})
    assert store.read_json("inventory.json") == {**record, "day": "2026-11-28"}
    assert store.read_json("BRKT01/stage-download.json") == {"status": "ok"}

    vectors = tmp_path / "vectors.npy"
    vectors.write_bytes(os.urandom(300_000))
    store.put_file("vectors.npy", vectors)
    fetched = store.get_file("vectors.npy", tmp_path / "elsewhere" / "vectors.npy")
    assert fetched.read_bytes() == vectors.read_bytes()

    assert store.exists("vectors.npy") and store.exists("BRKT01/stage-download.json")
    assert not store.exists("vectors") and not store.exists("BRKT01")
    assert not other.exists("vectors.npy")
    with pytest.raises(RunFileMissing):
        other.read_json("inventory.json")
    with pytest.raises(FileNotFoundError):  # RunFileMissing is one, as a missing work file was
        store.get_file("rows.json", tmp_path / "rows.json")
    assert not (tmp_path / "rows.json").exists()


def test_the_layout_is_the_work_directory_or_the_configured_prefix(open_store, tmp_path):
    store = open_store()
    store.write_json("stage-download.json", {})
    if open_store.backend == "local":
        work_dir = tmp_path / "cache" / "clip" / "runs" / "manual__2026-11-28T02_00_00.123456_00_00"
        assert store.local_dir == work_dir and store.location == str(work_dir)
        assert json.loads((work_dir / "stage-download.json").read_text()) == {}
    else:
        keys = [o.key for o in open_store.storage.list_objects("")]
        assert keys == ["airflow-runs/clip/manual__2026-11-28T02_00_00.123456_00_00/stage-download.json"]
        assert store.local_dir is None and store.location.startswith(f"s3://{open_store.storage.bucket}/airflow-runs/")


def test_directories_round_trip_and_a_second_put_replaces_the_first(open_store, tmp_path):
    store = open_store()
    first = make_tree(tmp_path / "bank1", {"memory_bank.pt": os.urandom(40_000), "bank_config.json": b"{}",
                                           "tau.json": b'{"image": 1.5}', "ok/a/b.jpg": b"\xff\xd8jpeg", "empty": b""})
    assert store.put_dir("BRKT01/bank", first) == 5
    assert store.exists("BRKT01/bank")
    assert read_tree(store.get_dir("BRKT01/bank", tmp_path / "out1")) == read_tree(first)

    second = make_tree(tmp_path / "bank2", {"memory_bank.pt": b"smaller", "tau.json": b"{}"})
    store.put_dir("BRKT01/bank", second)
    assert read_tree(store.get_dir("BRKT01/bank", tmp_path / "out2")) == read_tree(second)
    stored = {name for name in ("memory_bank.pt", "bank_config.json", "ok/a/b.jpg", "empty")
              if store.exists(f"BRKT01/bank/{name}")}
    assert stored == {"memory_bank.pt"}, "files the new tree lacks are removed"


def test_a_directory_can_leave_top_level_entries_out_and_texts_read_back(open_store, tmp_path):
    """How index_save stores a CLIP version without its images, and how a build log is read."""
    store = open_store()
    version = make_tree(tmp_path / "version", {"faiss_index.bin": b"idx", "metadata.json": b"{}",
                                               "images/1/a.jpg": b"jpg", "notes/images": b"kept: not top level"})
    assert store.put_dir("version", version, skip=["images"]) == 3
    assert read_tree(store.get_dir("version", tmp_path / "out")) == {
        "faiss_index.bin": b"idx", "metadata.json": b"{}", "notes/images": b"kept: not top level"}
    log_file = make_tree(tmp_path / "log", {"build.log": "정상 ok\n".encode() + b"\xff end"})
    store.put_file("BRKT01/build.log", log_file / "build.log")
    assert store.within("BRKT01").read_text("build.log") == "정상 ok\n\ufffd end"
    with pytest.raises(RunFileMissing):
        store.read_text("nothing.log")


def test_a_directory_without_its_manifest_is_absent(open_store, tmp_path):
    """What a task killed while storing a directory leaves: its files, no manifest."""
    store = open_store()
    part = make_tree(tmp_path / "part", {"memory_bank.pt": b"half"})
    store.put_file("bank/memory_bank.pt", part / "memory_bank.pt")
    assert not store.exists("bank")
    with pytest.raises(RunFileMissing, match="no complete run directory"):
        store.get_dir("bank", tmp_path / "out")


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "/etc/passwd", "a/../../x", "", ".", "a//b", "a/./b",
                                  "C:/x", "a\\..\\b", "x\x00y"])
def test_names_that_could_leave_the_run_are_refused(open_store, tmp_path, name):
    store = open_store()
    source = make_tree(tmp_path / "src", {"f": b"1"})
    for attempt in (lambda: store.write_json(name, {}), lambda: store.read_json(name),
                    lambda: store.put_file(name, source / "f"), lambda: store.get_file(name, tmp_path / "t"),
                    lambda: store.put_dir(name, source), lambda: store.get_dir(name, tmp_path / "t"),
                    lambda: store.exists(name)):
        with pytest.raises(UnsafeNameError):
            attempt()
    assert not (tmp_path / "x").exists() and not (tmp_path / "t").exists()


def test_a_stored_manifest_cannot_write_outside_the_target(open_store, tmp_path):
    store = open_store()
    store.write_json(f"bank/{DIR_MANIFEST}", {"files": {"../../escaped": 1}})
    with pytest.raises(UnsafeNameError):
        store.get_dir("bank", tmp_path / "a" / "b")
    assert not list(tmp_path.rglob("escaped"))


def test_run_ids_and_pipelines_cannot_leave_the_store(open_store):
    with pytest.raises(UnsafeNameError):
        open_store("..")
    with pytest.raises(UnsafeNameError):
        open_store(pipeline="../clip")
    escaped = open_store("../../etc")  # made a safe folder name, as work directories always were
    assert escaped.run == ".._.._etc"


def test_a_local_store_refuses_a_symlink_out_of_the_run(tmp_path):
    store = compose.run_store("clip", RUN_ID, dataclasses.replace(get_settings(), run_store="local", cache_root=tmp_path))
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", store.local_dir / "link")
    with pytest.raises(UnsafeKeyError):
        store.write_json("link/x.json", {})
    assert not list((tmp_path / "outside").iterdir())


def test_stage_records_go_to_a_store_or_a_work_directory(open_store, tmp_path):
    store = open_store()
    with record_stage(store, "download") as stage:
        stage.facts = {"images": 3}
    with pytest.raises(ValueError):
        with record_stage(store, "embed"):
            raise ValueError("no readable image")
    records = read_stages(store, ["download", "embed", "index_save"])
    assert records["download"]["status"] == "ok" and records["download"]["facts"] == {"images": 3}
    assert records["embed"]["status"] == "failed" and records["embed"]["message"] == "ValueError: no readable image"
    assert records["index_save"]["status"] == "not run"

    work_dir = tmp_path / "work"  # today's callers pass a directory
    with record_stage(work_dir, "download") as stage:
        stage.facts = {"images": 1}
    assert stage.path == work_dir / "stage-download.json"
    assert json.loads(stage.path.read_text())["facts"] == {"images": 1}
    assert read_stages(work_dir, ["download"])["download"]["status"] == "ok"


def test_a_products_records_live_in_its_folder_of_the_run(open_store, tmp_path):
    store = open_store()
    product = store.within("BRKT01")
    with record_stage(product, "download") as stage:
        stage.facts = {"images": 60}
    product.put_dir("bank", make_tree(tmp_path / "bank", {"memory_bank.pt": b"bank"}))
    assert store.read_json("BRKT01/stage-download.json")["facts"] == {"images": 60}
    assert store.exists("BRKT01/bank") and product.exists("bank") and not store.exists("bank")
    assert read_tree(store.get_dir("BRKT01/bank", tmp_path / "out")) == {"memory_bank.pt": b"bank"}
    assert read_stages(product, ["download", "publish"])["publish"]["status"] == "not run"
    assert read_stages(store.within("HSG02"), ["download"])["download"]["status"] == "not run"
    if open_store.backend == "local":
        assert product.local_dir == store.local_dir / "BRKT01" and stage.path == product.local_dir / stage.name
    with pytest.raises(UnsafeNameError):
        store.within("../BRKT01")
    product.remove_run()  # the whole run, as from the run's own store
    assert not store.exists("BRKT01/stage-download.json")


def test_remove_run_deletes_this_run_only(open_store, tmp_path):
    store, other = open_store(), open_store("manual__other")
    for each in (store, other):
        each.write_json("inventory.json", [])
        each.put_dir("bank", make_tree(tmp_path / "tree", {"a": b"1", "b/c": b"2"}))
    store.remove_run()
    assert not store.exists("inventory.json") and not store.exists("bank")
    assert other.exists("inventory.json") and other.exists("bank")
    store.remove_run()  # twice is fine


def test_sweep_removes_only_runs_not_written_to_since_the_cutoff(open_store):
    store = open_store("manual__current")
    old, mixed, new = open_store("manual__old"), open_store("manual__mixed"), open_store("manual__new")
    other_pipeline = open_store("manual__old_patchcore", pipeline="patchcore")
    for each in (store, old, mixed, other_pipeline):
        each.write_json("stage-download.json", {})
    time.sleep(1.1)  # object storage keeps LastModified to the second
    cutoff = time.time()
    time.sleep(1.1)
    mixed.write_json("stage-embed.json", {})
    new.write_json("stage-download.json", {})

    assert store.sweep(0, now=cutoff) == ["manual__old"]  # the sweeping run itself is never swept
    assert not old.exists("stage-download.json")
    assert all(each.exists("stage-download.json") for each in (store, mixed, new, other_pipeline))


def test_sweep_keeps_runs_younger_than_the_retention_setting(open_store):
    store, failed = open_store(run_retention_days=2), open_store("manual__failed")
    failed.write_json("stage-download.json", {})
    assert store.sweep() == []
    assert store.sweep(now=time.time() + 1.5 * 86400) == []
    assert store.sweep(now=time.time() + 2.5 * 86400) == ["manual__failed"]


def test_the_backend_and_prefix_come_from_the_environment(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECTION_RUN_STORE", "storage")
    monkeypatch.setenv("INSPECTION_RUN_STORE_PREFIX", "/custom/runs")
    monkeypatch.setenv("INSPECTION_RUN_RETENTION_DAYS", "3")
    store = compose.run_store("clip", "normal-" + RUN_ID)
    assert store.retention_days == 3
    try:
        store.write_json("stage-download.json", {"ok": True})
        keys = [o.key for o in compose.object_storage().list_objects("custom/")]
        assert keys == ["custom/runs/clip/normal-manual__2026-11-28T02_00_00.123456_00_00/stage-download.json"]
    finally:
        store.remove_run()
    monkeypatch.setenv("INSPECTION_RUN_STORE", "nfs")
    with pytest.raises(RunStoreError, match="INSPECTION_RUN_STORE must be one of local, storage"):
        compose.run_store("clip", RUN_ID)


def test_files_written_and_read_through_the_store_stay_in_place_locally(open_store, tmp_path):
    """How embed hands vectors.npy to index_save: written in the work directory, or stored once written."""
    store = open_store().within("BRKT01")
    with store.writing("vectors.npy") as path:
        assert path.name == "vectors.npy"  # np.save keeps a name that already ends in .npy
        path.write_bytes(b"vectors")
    with pytest.raises(ValueError), store.writing("rows.json") as path:
        path.write_bytes(b"half")
        raise ValueError("embedding failed")
    assert store.exists("vectors.npy") and (open_store.backend == "local") == store.exists("rows.json")
    with store.reading("vectors.npy") as path:
        assert path.read_bytes() == b"vectors"
    if open_store.backend == "local":
        assert path == store.local_dir / "vectors.npy" and path.exists()
    else:
        assert not path.exists() and store.local_dir is None and store.local_path("vectors.npy") is None
        with pytest.raises(RunFileMissing), store.reading("nothing.npy"):
            pass


def test_a_workspace_is_the_store_itself_locally_and_scratch_in_object_storage(open_store, tmp_path):
    """How a PatchCore build keeps its log: written in the workspace, kept, the scratch released."""
    store = open_store().within("BRKT01")
    scratch = make_tree(tmp_path / "scratch", {"left-by-an-earlier-try": b"x"})
    workspace = store.workspace(scratch)
    (workspace / "build.log").write_text("built\n")
    store.keep_file("build.log", workspace / "build.log")
    store.release(scratch)
    assert store.read_text("build.log") == "built\n"
    if open_store.backend == "local":
        assert workspace == store.local_dir and read_tree(scratch) == {"left-by-an-earlier-try": b"x"}
    else:
        assert workspace == scratch and not scratch.exists()
    other = make_tree(tmp_path / "elsewhere", {"build.log": b"copied\n"})
    store.keep_file("build.log", other / "build.log")  # not in the workspace: stored with either backend
    assert store.read_text("build.log") == "copied\n"


def test_a_kept_directory_is_found_in_place_or_fetched_and_refilled(open_store, tmp_path):
    """How index_save hands a staged version to publish, and a build its bank."""
    store = open_store()
    version = make_tree(tmp_path / "staging", {"manifest.json": b"{}", "images/1/a.jpg": b"jpg"})
    kept = store.keep_dir("version", version, skip=["images"])
    made, refilled, discarded = tmp_path / "fetched", [], []

    def make():
        made.mkdir()
        return made

    def fetch(**changes):
        return store.fetch_dir("version", kept, make, refill=refilled.append, discard=discarded.append, **changes)

    with fetch(keep_in_place=True) as directory:
        assert read_tree(directory) == {"manifest.json": b"{}", **({"images/1/a.jpg": b"jpg"}
                                                                   if open_store.backend == "local" else {})}
    found = store.find_dir("version", kept, done="manifest.json")
    assert found is not None and found.read_json("manifest.json") == {}
    if open_store.backend == "local":
        assert kept == {"staging": str(version)} and directory == version and refilled == [] and not made.exists()
        assert store.find_dir("version", kept, done="bank_config.json") is None
    else:
        assert kept == {} and directory == made and refilled == [made] and store.exists("version")
        assert open_store().find_dir("other", kept, done="manifest.json") is None
    for keep_in_place in (True, False):
        shutil.rmtree(made, ignore_errors=True)
        with pytest.raises(ValueError), fetch(keep_in_place=keep_in_place):
            raise ValueError("publishing failed")
    # A fetched copy is always discarded; the original kept in place only unless keep_in_place.
    assert discarded == ([version] if open_store.backend == "local" else [made, made])


def test_a_kept_directory_is_named_by_its_files_sha256_on_either_backend(open_store, tmp_path):
    """What an approval names: the same (size, sha256) per file whether hashed in place or read from the
    stored manifest, without what publish adds (``skip``); a rebuilt directory reads differently."""
    from inspection_refresh.files import tree_files

    store = open_store()
    version = make_tree(tmp_path / "staging", {"faiss_index.bin": b"v1", "sub/meta.json": b"{}", "images/a.jpg": b"j"})
    kept = store.keep_dir("version", version, skip=["images"])
    expected = tree_files(version, skip=("images",))
    assert set(expected) == {"faiss_index.bin", "sub/meta.json"}
    assert store.kept_files("version", kept, skip=("images",)) == expected
    make_tree(version, {"faiss_index.bin": b"v2"})  # rebuilt
    kept = store.keep_dir("version", version, skip=["images"])
    assert store.kept_files("version", kept, skip=("images",)) == tree_files(version, skip=("images",)) != expected
    if open_store.backend == "storage":
        manifest = store.read_json(f"version/{DIR_MANIFEST}")
        assert set(manifest["sha256"]) == set(manifest["files"]) == {"faiss_index.bin", "sub/meta.json"}
    else:
        shutil.rmtree(version)
        with pytest.raises(RunFileMissing, match="is gone"):
            store.kept_files("version", kept)


def test_images_and_paths_are_settled_by_the_task_whose_disk_they_are_on(open_store, tmp_path):
    store = open_store()
    recorded = [{"key": "images/normal/1/a.jpg", "etag": "e", "size": 1, "path": str(tmp_path / "a.jpg")}]
    if open_store.backend == "local":  # every task shares the download's mirror: no request is made
        assert store.fetch_images(None, "images/normal/1/", recorded, tmp_path / "mirror") == {
            "images/normal/1/a.jpg": tmp_path / "a.jpg"}
    else:  # this worker's mirror, brought to the inventory
        storage = open_store.storage
        storage.client.put_object(Bucket=storage.bucket, Key="images/normal/1/a.jpg", Body=b"jpeg")
        [listed] = storage.list_objects("images/normal/1/")
        recorded = [{"key": listed.key, "etag": listed.etag, "size": listed.size, "path": "/another/worker/a.jpg"}]
        images = store.fetch_images(storage, "images/normal/1/", recorded, tmp_path / "mirror")
        assert images == {"images/normal/1/a.jpg": tmp_path / "mirror" / "a.jpg"}
        assert images["images/normal/1/a.jpg"].read_bytes() == b"jpeg"
    settled = []
    assert store.settle_ahead(lambda: "ahead", otherwise="later") == (
        "ahead" if open_store.backend == "local" else "later")
    store.settle_here(lambda: settled.append("here"))
    assert settled == ([] if open_store.backend == "local" else ["here"])


def test_images_are_rematerialised_on_another_worker_downloading_only_what_it_lacks(storage, tmp_path):
    prefix = "images/normal/1/"
    for seq in range(3):
        storage.client.put_object(Bucket=storage.bucket, Key=f"{prefix}BRKT01_OK_{seq}.jpg",
                                  Body=os.urandom(2000 + seq))
    # The download task, on worker A: mirror, then the inventory it hands on (key, etag, size).
    synced = storage.sync_prefix(prefix, tmp_path / "worker-a" / "images")
    inventory = [{"key": o.key, "etag": o.etag, "size": o.size, "path": str(synced.files[o.key])}
                 for o in storage.list_objects(prefix)]

    mirror_b = tmp_path / "worker-b" / "images"
    first = materialise_images(storage, prefix, inventory, mirror_b)
    assert (first.downloaded, first.unchanged, first.failed) == (3, 0, [])
    assert {key: path.read_bytes() for key, path in first.files.items()} == {
        key: path.read_bytes() for key, path in synced.files.items()}

    # One image changed in storage since (a new ETag in the next inventory), one left the inventory.
    storage.client.put_object(Bucket=storage.bucket, Key=f"{prefix}BRKT01_OK_1.jpg", Body=b"changed")
    unchanged_inode = first.files[f"{prefix}BRKT01_OK_0.jpg"].stat().st_ino
    listed = {o.key: o for o in storage.list_objects(prefix)}
    inventory = [{"key": key, "etag": listed[key].etag, "size": listed[key].size}
                 for key in (f"{prefix}BRKT01_OK_0.jpg", f"{prefix}BRKT01_OK_1.jpg")]
    second = materialise_images(storage, prefix, inventory, mirror_b)
    assert (second.downloaded, second.unchanged, second.deleted) == (1, 1, 1)
    assert second.files[f"{prefix}BRKT01_OK_1.jpg"].read_bytes() == b"changed"
    assert second.files[f"{prefix}BRKT01_OK_0.jpg"].stat().st_ino == unchanged_inode
    assert sorted(p.name for p in mirror_b.iterdir() if not p.name.startswith(".")) == [
        "BRKT01_OK_0.jpg", "BRKT01_OK_1.jpg"]

    third = materialise_images(storage, prefix, inventory, mirror_b)
    assert (third.downloaded, third.unchanged) == (0, 2)


def test_an_unusable_inventory_leaves_the_mirror_alone(storage, tmp_path):
    mirror = make_tree(tmp_path / "mirror", {"keep.jpg": b"x"})
    with pytest.raises(ValueError, match="key, etag or size"):
        materialise_images(storage, "images/normal/1/", [{"key": "images/normal/1/a.jpg", "etag": "e"}], mirror)
    with pytest.raises(UnsafeKeyError):
        materialise_images(storage, "images/normal/1/",
                           [{"key": "images/normal/1/../../../x.jpg", "etag": "e", "size": 1}], mirror)
    assert read_tree(mirror) == {"keep.jpg": b"x"}
