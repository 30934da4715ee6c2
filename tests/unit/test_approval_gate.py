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
