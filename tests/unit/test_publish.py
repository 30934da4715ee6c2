"""Versioned atomic publishing: readers never see a mix, failures keep the old version, rollback works,
and the root the service scans only ever holds the live symlinks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from inspection_refresh import publish_migration as publish_module
from inspection_refresh.cli import main
from inspection_refresh.publish import PIN_FILE, LostToRollback, Publisher, PublishError
from inspection_refresh.releases_dir import MARKER_FILE, is_published_root


@pytest.fixture
def root(tmp_path) -> Path:
    """The root the service scans; its default releases directory is the sibling ``root.releases``."""
    return tmp_path / "root"


def publish_files(publisher: Publisher, name: str, version: str, files: dict[str, str]) -> None:
    staging = publisher.stage(name)
    for file_name, text in files.items():
        (staging / file_name).write_text(text)
    publisher.publish(name, staging, version)


def make_old_layout(root: Path, live: dict[str, str], kept: dict[str, list[str]]) -> None:
    """A root as older code left it: versions in ``root/.releases``, swap links and staging inside."""
    for name, versions in kept.items():
        for version in versions:
            (root / ".releases" / name / version).mkdir(parents=True)
            (root / ".releases" / name / version / "a.txt").write_text(f"{name} {version}")
        (root / ".releases" / name / ".staging-0123456789ab").mkdir()
        os.symlink(os.path.join(".releases", name, live[name]), root / name)
    os.symlink(os.path.join(".releases", "A", kept["A"][0]), root / ".A.swap-1234abcd")


@pytest.fixture
def assert_always_live(monkeypatch):
    """After every rename, replace, exchange or tree removal, each given name must still be readable."""
    checks = [0]

    def watch(root: Path, names: list[str]) -> list[int]:
        def checked(function):
            def call(*args, **kwargs):
                result = function(*args, **kwargs)
                for name in names:
                    assert (root / name / "a.txt").is_file(), f"{name} went missing after {function.__name__}{args}"
                checks[0] += 1
                return result
            return call

        monkeypatch.setattr(os, "rename", checked(os.rename))
        monkeypatch.setattr(os, "replace", checked(os.replace))
        monkeypatch.setattr(shutil, "rmtree", checked(shutil.rmtree))
        monkeypatch.setattr(publish_module, "_exchange", checked(publish_module._exchange))
        return checks

    return watch


def test_publish_swaps_the_live_directory_and_keeps_versions_outside_the_root(root):
    publisher = Publisher(root, keep=5)
    publish_files(publisher, "normal", "v1", {"a.txt": "one"})
    publish_files(publisher, "normal", "v2", {"a.txt": "two"})
    assert (root / "normal" / "a.txt").read_text() == "two"
    # relative, so a root moved together with its releases directory stays valid
    assert os.readlink(root / "normal") == os.path.join("..", "root.releases", "normal", "v2")
    assert publisher.current("normal") == "v2"
    assert publisher.versions("normal") == ["v1", "v2"]
    assert os.listdir(root) == ["normal"]
    assert (root.parent / "root.releases" / MARKER_FILE).read_text().strip() == str(root)


def test_the_releases_directory_can_be_chosen_but_not_inside_the_root(root, tmp_path):
    publisher = Publisher(root, releases=tmp_path / "kept" / "versions")
    publish_files(publisher, "normal", "v1", {"a.txt": "one"})
    assert (tmp_path / "kept" / "versions" / "normal" / "v1" / "a.txt").is_file()
    assert os.readlink(root / "normal") == os.path.join("..", "kept", "versions", "normal", "v1")
    with pytest.raises(PublishError, match="must be outside"):
        Publisher(root, releases=root / ".releases")


def test_settings_keep_releases_beside_the_roots_unless_told_otherwise(monkeypatch, tmp_path):
    from inspection_refresh.config import get_settings

    monkeypatch.setenv("INSPECTION_PATCHCORE_ROOT", "/data/patchCore")
    monkeypatch.delenv("INSPECTION_PATCHCORE_RELEASES", raising=False)
    monkeypatch.setenv("INSPECTION_INDEX_RELEASES", str(tmp_path / "kept"))
    settings = get_settings()
    assert settings.patchcore_releases == Path("/data/patchCore.releases")
    assert settings.index_releases == tmp_path / "kept"


def test_root_holds_only_the_live_links_after_a_stale_swap_link(root):
    publisher = Publisher(root)
    publish_files(publisher, "A", "v1", {"a.txt": "A1"})
    publish_files(publisher, "B", "v1", {"a.txt": "B1"})
    os.symlink("../root.releases/A/v1", root / ".A.swap-deadbeef")  # older code crashed mid-swap
    os.symlink("v1", publisher.releases / "A" / ".swap-deadbeef")  # this code crashed mid-swap
    publish_files(publisher, "A", "v2", {"a.txt": "A2"})
    assert sorted(os.listdir(root)) == ["A", "B"]
    assert sorted(p.name for p in (publisher.releases / "A").iterdir()) == ["v1", "v2"]


def test_rollback_republishes_the_previous_version_and_can_roll_forward(root, tmp_path, capsys):
    releases = tmp_path / "elsewhere"
    publisher = Publisher(root, releases=releases)
    for version in ("v1", "v2", "v3"):
        publish_files(publisher, "defect", version, {"a.txt": version})
    assert main(["rollback", "--root", str(root), "--releases", str(releases), "--name", "defect"]) == 0
    assert (root / "defect" / "a.txt").read_text() == "v2"
    assert "live version is now v2" in capsys.readouterr().out
    publisher.rollback("defect", to="v3")
    assert publisher.current("defect") == "v3"
    with pytest.raises(PublishError, match="not kept"):
        publisher.rollback("defect", to="v9")
    assert main(["list", "--root", str(root), "--releases", str(releases), "--name", "defect"]) == 0
    assert "* v3" in capsys.readouterr().out


def test_the_command_line_finds_the_default_releases_directory(root, capsys):
    publisher = Publisher(root)
    for version in ("v1", "v2"):
        publish_files(publisher, "normal", version, {"a.txt": version})
    assert main(["rollback", "--root", str(root), "--name", "normal"]) == 0
    assert main(["list", "--root", str(root), "--name", "normal"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["* v1", "  v2"]


def test_rollback_with_nothing_older_is_a_clear_error(root):
    publisher = Publisher(root)
    publish_files(publisher, "normal", "v1", {"a.txt": "1"})
    with pytest.raises(PublishError, match="no version of 'normal' older than v1"):
        publisher.rollback("normal")


def test_old_versions_are_pruned_but_the_live_one_is_kept(root):
    publisher = Publisher(root, keep=2)
    for i in range(1, 5):
        publish_files(publisher, "normal", f"v{i}", {"a.txt": str(i)})
    assert publisher.versions("normal") == ["v3", "v4"]
    publisher.rollback("normal", to="v3")
    publish_files(publisher, "normal", "v5", {"a.txt": "5"})
    assert publisher.versions("normal") == ["v4", "v5"]


def test_a_crash_before_the_swap_leaves_the_old_version_live(root):
    publisher = Publisher(root)
    publish_files(publisher, "normal", "v1", {"a.txt": "old"})
    staging = publisher.stage("normal")
    (staging / "a.txt").write_text("half-written new version")
    # ... the process dies here, before publish() ...
    assert (root / "normal" / "a.txt").read_text() == "old"
    next_staging = publisher.stage("normal")  # the next run clears the leftover
    assert not staging.exists() and next_staging.exists()
    assert os.listdir(root) == ["normal"]


def test_an_old_layout_is_moved_out_of_the_root_without_a_gap(root, assert_always_live, caplog):
    make_old_layout(root, live={"A": "v2", "B": "v1"}, kept={"A": ["v1", "v2"], "B": ["v1"]})
    assert is_published_root(root)
    publisher = Publisher(root)
    checks = assert_always_live(root, ["A", "B"])
    with caplog.at_level(logging.INFO, logger="inspection_refresh.publish"):
        publish_files(publisher, "A", "v3", {"a.txt": "A v3"})
    assert checks[0] > 5
    assert sorted(os.listdir(root)) == ["A", "B"]
    assert [r.message for r in caplog.records if r.message.startswith("Moved")] == [
        f"Moved 2 kept versions of A from {root}/.releases/A to {publisher.releases}/A",
        f"Moved 1 kept versions of B from {root}/.releases/B to {publisher.releases}/B",
    ]
    assert publisher.versions("A") == ["v1", "v2", "v3"] and publisher.versions("B") == ["v1"]
    assert (root / "B" / "a.txt").read_text() == "B v1"
    assert os.readlink(root / "B") == os.path.join("..", "root.releases", "B", "v1")
    publisher.rollback("A")
    assert (root / "A" / "a.txt").read_text() == "A v2"
    assert is_published_root(root)


def test_rollback_moves_an_old_layout_first(root):
    make_old_layout(root, live={"A": "v2", "B": "v1"}, kept={"A": ["v1", "v2"], "B": ["v1"]})
    Publisher(root).rollback("A")
    assert (root / "A" / "a.txt").read_text() == "A v1"
    assert sorted(os.listdir(root)) == ["A", "B"]


def test_an_existing_plain_directory_is_kept_as_a_legacy_version_without_a_gap(root, assert_always_live):
    legacy = root / "normal"
    legacy.mkdir(parents=True)
    (legacy / "a.txt").write_text("from the old service")
    publisher = Publisher(root)
    staging = publisher.stage("normal")
    (staging / "a.txt").write_text("new")
    checks = assert_always_live(root, ["normal"])
    publisher.publish("normal", staging, "v1")
    assert checks[0] > 0
    assert (root / "normal" / "a.txt").read_text() == "new"
    assert os.listdir(root) == ["normal"]
    [kept] = [v for v in publisher.versions("normal") if v.endswith("-legacy")]
    publisher.rollback("normal", to=kept)
    assert (root / "normal" / "a.txt").read_text() == "from the old service"


def test_without_an_atomic_exchange_a_plain_directory_is_still_adopted(root, monkeypatch, caplog):
    def unsupported(first, second):
        raise publish_module._ExchangeUnsupported(38, "Function not implemented")

    monkeypatch.setattr(publish_module, "_exchange", unsupported)
    (root / "normal").mkdir(parents=True)
    (root / "normal" / "a.txt").write_text("from the old service")
    publisher = Publisher(root)
    publish_files(publisher, "normal", "v1", {"a.txt": "new"})
    assert "is missing for a moment" in caplog.text
    assert os.listdir(root) == ["normal"]
    assert not list((publisher.releases / "normal").glob(".*"))  # no swap link or parked directory left
    publisher.rollback("normal")
    assert (root / "normal" / "a.txt").read_text() == "from the old service"


def test_published_roots_are_recognised(root, tmp_path):
    assert not is_published_root(tmp_path / "missing")
    (root / "PLAIN01").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "LINKED02")
    assert not is_published_root(root)  # a root someone fills by hand
    publish_files(Publisher(root, releases=tmp_path / "kept"), "A", "v1", {"a.txt": "A1"})
    assert is_published_root(root)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 101])
def test_unsafe_names_are_refused(root, name):
    with pytest.raises(PublishError, match="invalid artefact name"):
        Publisher(root).stage(name)


def test_readers_never_see_a_mix_of_versions(root):
    publisher = Publisher(root, keep=3)
    publish_files(publisher, "normal", "v0000", {"a.txt": "0", "b.txt": "0"})
    mixes, reads, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            live = os.path.realpath(root / "normal")  # how a loader should resolve the directory once
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


def test_the_cli_rollback_pins_and_list_and_unpin_show_and_remove_the_pin(root, capsys):
    publisher = Publisher(root)
    for version in ("v1", "v2"):
        publish_files(publisher, "normal", version, {"a.txt": version})
    assert main(["rollback", "--root", str(root), "--name", "normal"]) == 0
    pin = publisher.pinned("normal")
    assert pin["version"] == "v1" and pin["pinned_by"].startswith("cli") and pin["pinned_at"]
    pin_file = publisher.releases / "normal" / PIN_FILE
    assert json.loads(pin_file.read_text()) == pin
    assert os.listdir(root) == ["normal"] and publisher.versions("normal") == ["v1", "v2"]
    assert "live version is now v1, pinned" in capsys.readouterr().out
    assert main(["list", "--root", str(root), "--name", "normal"]) == 0
    out = capsys.readouterr().out
    assert "normal is pinned to version v1 by cli" in out and out.splitlines()[-2:] == ["* v1", "  v2"]
    assert main(["unpin", "--root", str(root), "--name", "normal"]) == 0
    assert "normal: unpinned (was pinned to version v1 by cli" in capsys.readouterr().out
    assert publisher.pinned("normal") is None and not pin_file.exists()
    assert main(["unpin", "--root", str(root), "--name", "normal"]) == 0
    assert "normal: was not pinned" in capsys.readouterr().out


def test_a_pinned_name_is_published_over_only_when_unpinning(root):
    publisher = Publisher(root)
    for version in ("v1", "v2"):
        publish_files(publisher, "normal", version, {"a.txt": version})
    publisher.rollback("normal", pinned_by="airflow:admin", run_id="manual__1")
    assert publisher.pinned("normal")["run_id"] == "manual__1"
    staging = publisher.stage("normal")
    (staging / "a.txt").write_text("v3")
    with pytest.raises(PublishError, match="normal is pinned to version v1 by airflow:admin"):
        publisher.publish("normal", staging, "v3")
    assert publisher.current("normal") == "v1" and publisher.pinned("normal")
    publisher.publish("normal", staging, "v3", unpin=True)
    assert publisher.current("normal") == "v3" and publisher.pinned("normal") is None


def test_only_kept_versions_can_be_pinned_and_an_unreadable_pin_is_an_error(root):
    publisher = Publisher(root)
    publish_files(publisher, "normal", "v1", {"a.txt": "1"})
    with pytest.raises(PublishError, match="not a kept version"):
        publisher.pin("normal", "v9", "me")
    (publisher.releases / "normal" / PIN_FILE).write_text("{half a pin")
    with pytest.raises(PublishError, match="unreadable.*inspection-publish unpin"):
        publisher.pinned("normal")
    assert publisher.unpin("normal")
    assert publisher.pinned("normal") is None
    assert publisher.versions("normal") == ["v1"] and publisher.names() == ["normal"]


def test_nothing_newer_than_the_live_version_is_pruned(root):
    publisher = Publisher(root, keep=2)
    for version in ("v3", "v4", "v5"):
        publish_files(publisher, "normal", version, {"a.txt": version})
    assert publisher.versions("normal") == ["v4", "v5"]
    publish_files(publisher, "normal", "v1", {"a.txt": "1"})  # live, and older than what was kept
    assert publisher.current("normal") == "v1"
    assert publisher.versions("normal") == ["v1", "v4", "v5"]


def test_a_rollback_that_takes_the_lock_first_wins_and_the_publish_publishes_nothing(root):
    publisher = Publisher(root)
    for version in ("v1", "v2"):
        publish_files(publisher, "normal", version, {"a.txt": version})
    staging = publisher.stage("normal")
    (staging / "a.txt").write_text("v3")
    taken: list[str] = []

    @contextmanager
    def lock(name: str):  # another host rolls back while this publish was uploading, and gets the lock first
        if not taken:
            taken.append(name)
            Publisher(root).rollback(name, "v1", pinned_by="airflow:alice")
        yield

    with pytest.raises(LostToRollback, match="^rolled back to v1 by airflow:alice while this run was uploading; "
                                             "nothing published$"):
        Publisher(root, lock=lock).publish("normal", staging, "v3", unpin=True)  # a manual run: it would unpin
    assert taken == ["normal"]  # one lock per change; prune and the rest run under it
    assert publisher.current("normal") == "v1" and publisher.pinned("normal")["version"] == "v1"
    assert publisher.versions("normal") == ["v1", "v2"] and staging.is_dir()  # left for the task to discard


def test_a_serving_host_reads_and_leaves_no_pin(root):
    publisher = Publisher(root)
    publish_files(publisher, "normal", "v1", {"a.txt": "1"})
    publisher.pin("normal", "v1", "cli:root")
    serving = Publisher(root, pins=False)
    assert serving.pinned("normal") is None
    publish_files(serving, "normal", "v2", {"a.txt": "2"})  # not refused
    assert serving.current("normal") == "v2" and not (serving.releases / "normal" / PIN_FILE).exists()
    with pytest.raises(PublishError, match="follows the channel's current.json"):
        serving.pin("normal", "v1", "me")


def test_a_swap_that_fails_puts_the_pin_back_and_leaves_the_version_staged(root, monkeypatch):
    publisher = Publisher(root)
    for version in ("v1", "v2"):
        publish_files(publisher, "normal", version, {"a.txt": version})
    publisher.rollback("normal", "v1", pinned_by="airflow:alice")
    staging = publisher.stage("normal")
    (staging / "a.txt").write_text("v3")

    def no_swap(self, name, version):
        raise OSError("disk gone")

    monkeypatch.setattr(Publisher, "_point_to", no_swap)
    with pytest.raises(OSError, match="disk gone"):
        publisher.publish("normal", staging, "v3", unpin=True)
    monkeypatch.undo()
    assert publisher.current("normal") == "v1" and publisher.pinned("normal")["pinned_by"] == "airflow:alice"
    assert (staging / "a.txt").read_text() == "v3" and "v3" not in publisher.versions("normal")
    publisher.publish("normal", staging, "v3", unpin=True)  # the retry
    assert publisher.current("normal") == "v3" and publisher.pinned("normal") is None
