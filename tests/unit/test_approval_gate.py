"""When a run waits for approval, for how long, and what its recorded answer lets ``publish`` do."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from inspection_refresh.operators import (
    APPROVAL_MIN_WAIT,
    approval_required,
    approval_wait,
)
from inspection_refresh.tasks import approval
from inspection_refresh.tasks.common import NothingToDo

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("param, scheduled, scheduled_default, required", [
    (False, False, True, False),  # a manual run without the param never waits
    (True, False, False, True),
    (False, True, True, True),  # scheduled PatchCore runs, by default
    (False, True, False, False),  # scheduled CLIP runs, or INSPECTION_APPROVE_SCHEDULED_PATCHCORE=false
])
def test_who_waits_for_approval(param, scheduled, scheduled_default, required):
    assert approval_required({"require_approval": param}, scheduled, scheduled_default) is required


def context(started: datetime, run_timeout: timedelta | None) -> dict:
    return {"dag": SimpleNamespace(dagrun_timeout=run_timeout), "dag_run": SimpleNamespace(start_date=started)}


def test_the_wait_ends_before_the_runs_timeout():
    four_hours = timedelta(hours=4)
    # A fresh 8 h PatchCore run: the full 4 h.
    assert approval_wait(context(NOW, timedelta(hours=8)), four_hours, now=NOW) == four_hours
    # A CLIP run that took 1 h to build: 3 h - 1 h - 20 min margin.
    assert approval_wait(context(NOW - timedelta(hours=1), timedelta(hours=3)), four_hours, now=NOW) == timedelta(
        hours=1, minutes=40)
    # Almost out of time: still a short wait rather than none.
    late = context(NOW - timedelta(hours=2, minutes=55), timedelta(hours=3))
    assert approval_wait(late, four_hours, now=NOW) == APPROVAL_MIN_WAIT
    # A shorter configured wait always wins; no dagrun_timeout: the configured wait.
    assert approval_wait(late, timedelta(seconds=3), now=NOW) == timedelta(seconds=3)
    assert approval_wait(context(NOW, None), four_hours, now=NOW) == four_hours


def test_only_an_approved_record_lets_publish_go_ahead(tmp_path):
    with pytest.raises(NothingToDo, match="approval step did not run"):
        approval.require_approved(tmp_path, "the bank of TEX01")
    approval.record_decision(tmp_path, approval.WAITING, "", required=True, summary={"images_after": 5},
                             timeout="0:00:03", asked_at="2026-11-28T12:00:00+00:00")
    with pytest.raises(NothingToDo):
        approval.require_approved(tmp_path, "the bank of TEX01")
    assert "did not finish" in approval.blocked_message(approval.read_decision(tmp_path))

    approval.record_answer(tmp_path, "Reject", {"id": "u7", "name": "bob"}, NOW)
    with pytest.raises(NothingToDo, match="not published: rejected by bob"):
        approval.require_approved(tmp_path, "the bank of TEX01")
    facts = approval.decision_facts(approval.read_decision(tmp_path))
    assert facts["summary"] == {"images_after": 5}  # what the approver saw stays with the answer
    assert (facts["status"], facts["decision"], facts["by"], facts["at"]) == ("rejected", "rejected", "bob",
                                                                              NOW.isoformat())

    approval.record_answer(tmp_path, "Approve", {"id": "u1", "name": "alice"}, NOW)
    approval.require_approved(tmp_path, "the bank of TEX01")  # no exception
    assert approval.blocked_message(approval.read_decision(tmp_path)) is None


def test_a_timeout_says_how_long_it_waited(tmp_path):
    approval.record_decision(tmp_path, approval.WAITING, "", timeout="0:00:03", asked_at="2026-11-28T12:00:00+00:00")
    record = approval.record_timeout(tmp_path)
    assert record["status"] == approval.TIMED_OUT
    assert approval.blocked_message(record) == ("approval timed out: nobody approved or rejected publishing within "
                                                "0:00:03 (asked at 2026-11-28T12:00:00+00:00)")


def test_publish_refuses_anything_but_what_was_approved(tmp_path):
    from inspection_refresh.files import tree_digest, tree_files

    staged = tmp_path / "staging"
    (staged / "images").mkdir(parents=True)
    (staged / "faiss_index.bin").write_bytes(b"index v1")
    (staged / "images" / "a.jpg").write_bytes(b"jpg")
    files = tree_files(staged, skip=("images",))
    assert list(files) == ["faiss_index.bin"]  # the images are named by the version's own manifest
    named = approval.target("v1", files)
    assert named == {"version": "v1", "sha256": tree_digest(files), "files": 1, "bytes": 8}
    work = tmp_path / "run"
    work.mkdir()

    def now(version: str = "v1") -> dict:
        return approval.target(version, tree_files(staged, skip=("images",)))

    # Nobody asked (approval not required): nothing to compare.
    approval.record_decision(work, approval.APPROVED, required=False, decision="not required")
    approval.require_as_approved(work, "normal", "normal index version v2", lambda: now("v2"))

    approval.record_decision(work, approval.WAITING, "", required=True, targets={"normal": named})
    approval.record_answer(work, "Approve", {"id": "u1", "name": "alice"}, NOW)
    approval.require_as_approved(work, "normal", "normal index version v1", now)  # the same files: no exception
    assert approval.decision_facts(approval.read_decision(work))["targets"] == {"normal": named}

    (staged / "faiss_index.bin").write_bytes(b"index v2")  # index_save cleared: rebuilt
    with pytest.raises(approval.NotWhatWasApproved) as refused:
        approval.require_as_approved(work, "normal", "normal index version v2", lambda: now("v2"))
    message = str(refused.value)
    assert message.startswith(f"normal index version v2 is not what was approved (approved version v1, sha256 "
                              f"{named['sha256'][:16]}…, 1 files; now version v2, sha256 ")
    assert message.endswith("nothing published; clear the run's approve task to ask again")
    with pytest.raises(approval.NotWhatWasApproved, match=r"approved nothing; now sha256"):
        approval.require_as_approved(work, "TEX01", "the bank of TEX01", lambda: approval.target(None, files))

    # Asked again (approve cleared): the new answer names the new files.
    approval.record_decision(work, approval.WAITING, "", required=True, targets={"normal": now("v2")})
    approval.record_answer(work, "Approve", {"id": "u2", "name": "bob"}, NOW)
    approval.require_as_approved(work, "normal", "normal index version v2", lambda: now("v2"))


def test_a_tree_digest_names_paths_sizes_and_contents():
    from inspection_refresh.files import tree_digest

    files = {"b/x.pt": (3, "aa" * 32), "a.json": (2, "bb" * 32)}
    assert tree_digest(files) == tree_digest(dict(reversed(list(files.items()))))  # order does not matter
    for changed in ({**files, "a.json": (2, "cc" * 32)}, {**files, "a.json": (3, "bb" * 32)},
                    {"b/y.pt": files["b/x.pt"], "a.json": files["a.json"]}, {"a.json": files["a.json"]}):
        assert tree_digest(changed) != tree_digest(files)


def test_the_clip_request_counts_add_up():
    from inspection_refresh.tasks.clip_index.publishing import image_changes, image_intake

    urls = [f"https://s3/b/images/normal/1/BRKT01_OK_{i:03d}.jpg" for i in range(3)]
    assert image_changes(60, 60, [], []) == "Indexed images: 60 → 60: 0 added, 0 removed."
    assert image_changes(4, 5, urls[:2], urls[2:]) == (
        "Indexed images: 4 → 5: 2 added, 1 removed (added: BRKT01_OK_000.jpg, BRKT01_OK_001.jpg) "
        "(removed: BRKT01_OK_002.jpg).")
    assert image_changes(None, 5, [], []) == "Indexed images: 5 (no index is live yet)."
    # The request: 61 downloaded, 1 unreadable, 60 indexed (and not "1 added").
    downloaded = {"files": 61, "num_missing": 0, "num_skipped": 2}
    embedded = {"unreadable": [["images/defect/7_3/corrupt_HOL_9999.jpg", "cannot identify image"]],
                "num_unreadable": 1}
    assert image_intake(downloaded, embedded, 60) == (
        "Images: downloaded 61, unreadable 1 (skipped: corrupt_HOL_9999.jpg), indexed 60, "
        "2 other objects skipped (not images).")
    assert image_intake({"files": 5, "num_missing": 1}, {}, 5) == (
        "Images: downloaded 5, indexed 5, missing 1 (could not be downloaded).")
