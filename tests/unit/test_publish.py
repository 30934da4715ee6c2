"""Versioned atomic publishing: readers never see a mix, failures keep the old version, rollback works."""

from __future__ import annotations

import os
import threading

import pytest

from inspection_refresh.publish import Publisher, PublishError, main


def publish_files(publisher: Publisher, name: str, version: str, files: dict[str, str]) -> None:
    staging = publisher.stage(name)
    for file_name, text in files.items():
        (staging / file_name).write_text(text)
    publisher.publish(name, staging, version)


def test_publish_swaps_the_live_directory_and_keeps_versions(tmp_path):
    publisher = Publisher(tmp_path, keep=5)
    publish_files(publisher, "normal", "v1", {"a.txt": "one"})
    publish_files(publisher, "normal", "v2", {"a.txt": "two"})
    assert (tmp_path / "normal" / "a.txt").read_text() == "two"
    assert os.readlink(tmp_path / "normal") == os.path.join(".releases", "normal", "v2")  # relative: movable root
    assert publisher.current("normal") == "v2"
    assert publisher.versions("normal") == ["v1", "v2"]


def test_rollback_republishes_the_previous_version_and_can_roll_forward(tmp_path, capsys):
    publisher = Publisher(tmp_path)
    for version in ("v1", "v2", "v3"):
        publish_files(publisher, "defect", version, {"a.txt": version})
    assert main(["rollback", "--root", str(tmp_path), "--name", "defect"]) == 0
    assert (tmp_path / "defect" / "a.txt").read_text() == "v2"
    assert "live version is now v2" in capsys.readouterr().out
    publisher.rollback("defect", to="v3")
    assert publisher.current("defect") == "v3"
    with pytest.raises(PublishError, match="not kept"):
        publisher.rollback("defect", to="v9")
    assert main(["list", "--root", str(tmp_path), "--name", "defect"]) == 0
    assert "* v3" in capsys.readouterr().out


def test_rollback_with_nothing_older_is_a_clear_error(tmp_path):
    publisher = Publisher(tmp_path)
    publish_files(publisher, "normal", "v1", {"a.txt": "1"})
    with pytest.raises(PublishError, match="no version of 'normal' older than v1"):
        publisher.rollback("normal")


def test_old_versions_are_pruned_but_the_live_one_is_kept(tmp_path):
    publisher = Publisher(tmp_path, keep=2)
    for i in range(1, 5):
        publish_files(publisher, "normal", f"v{i}", {"a.txt": str(i)})
    assert publisher.versions("normal") == ["v3", "v4"]
    publisher.rollback("normal", to="v3")
    publish_files(publisher, "normal", "v5", {"a.txt": "5"})
    assert publisher.versions("normal") == ["v4", "v5"]


def test_a_crash_before_the_swap_leaves_the_old_version_live(tmp_path):
    publisher = Publisher(tmp_path)
    publish_files(publisher, "normal", "v1", {"a.txt": "old"})
    staging = publisher.stage("normal")
    (staging / "a.txt").write_text("half-written new version")
    # ... the process dies here, before publish() ...
    assert (tmp_path / "normal" / "a.txt").read_text() == "old"
    next_staging = publisher.stage("normal")  # the next run clears the leftover
    assert not staging.exists() and next_staging.exists()


def test_an_existing_plain_directory_is_kept_as_a_legacy_version(tmp_path):
    legacy = tmp_path / "normal"
    legacy.mkdir()
    (legacy / "faiss_index.bin").write_text("from the old service")
    publisher = Publisher(tmp_path)
    publish_files(publisher, "normal", "v1", {"faiss_index.bin": "new"})
    assert (tmp_path / "normal" / "faiss_index.bin").read_text() == "new"
    [kept] = [v for v in publisher.versions("normal") if v.endswith("-legacy")]
    publisher.rollback("normal", to=kept)
    assert (tmp_path / "normal" / "faiss_index.bin").read_text() == "from the old service"


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 101])
def test_unsafe_names_are_refused(tmp_path, name):
    with pytest.raises(PublishError, match="invalid artefact name"):
        Publisher(tmp_path).stage(name)


def test_readers_never_see_a_mix_of_versions(tmp_path):
    publisher = Publisher(tmp_path, keep=3)
    publish_files(publisher, "normal", "v0000", {"a.txt": "0", "b.txt": "0"})
    mixes, reads, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            live = os.path.realpath(tmp_path / "normal")  # how a loader should resolve the directory once
            try:
                a = open(os.path.join(live, "a.txt")).read()
                b = open(os.path.join(live, "b.txt")).read()
            except FileNotFoundError:
                continue  # a pruned old version; the reader retries with the new one
            reads[0] += 1
            if a != b:
                mixes.append((a, b))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(1, 150):
        publish_files(publisher, "normal", f"v{i:04d}", {"a.txt": str(i), "b.txt": str(i)})
    stop.set()
    thread.join()
    assert reads[0] > 0 and mixes == []
