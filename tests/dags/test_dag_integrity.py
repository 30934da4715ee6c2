"""Every DAG file parses, follows the project's conventions and stays light at parse time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPECTED_DAGS = {"clip_index_normal", "clip_index_defect", "patchcore_memory_bank", "deployment_rollback"}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors_and_all_dags_present(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == EXPECTED_DAGS


def test_conventions(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 200, f"{dag_id} has no real doc_md"
        assert dag.max_active_runs == 1, f"{dag_id} must queue a second trigger instead of racing"
        assert dag.catchup is False
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", f"{dag_id}.{task.task_id} has no owner"
            assert task.execution_timeout is not None, f"{dag_id}.{task.task_id} has no execution timeout"
        retried = [t.task_id for t in dag.tasks if t.retries >= 1]
        assert retried, f"{dag_id} retries nothing"
        for name, param in dag.params.items():
            schema = param.schema
            assert schema.get("title"), f"{dag_id} param {name} has no title for the trigger form"


def test_clip_dags_come_from_one_factory(dagbag):
    normal, defect = dagbag.dags["clip_index_normal"], dagbag.dags["clip_index_defect"]
    assert [t.task_id for t in normal.tasks] == ["download", "embed", "index_save", "approve", "publish", "register"]
    assert [t.task_id for t in defect.tasks] == [t.task_id for t in normal.tasks]
    assert normal.params["prefix"] == "images/normal/" and defect.params["prefix"] == "images/defect/"
    assert normal.get_task("download").retries == 3 and normal.get_task("download").retry_exponential_backoff


def test_patchcore_builds_through_a_pooled_bash_operator(dagbag):
    dag = dagbag.dags["patchcore_memory_bank"]
    build = dag.get_task("product.build")
    assert type(build).__name__ == "BashOperator"
    assert build.pool == "patchcore_build"
    assert not build.bash_command.strip().endswith(".sh")  # would be read as a Jinja template file


def test_every_dag_times_out_and_closes_its_deployment_record_when_it_fails(dagbag):
    from datetime import timedelta

    from inspection_refresh.operators import close_deployment_on_failure

    hours = {"clip_index_normal": 3, "clip_index_defect": 3, "patchcore_memory_bank": 8, "deployment_rollback": 1}
    for dag_id, timeout_hours in hours.items():
        dag = dagbag.dags[dag_id]
        assert dag.on_failure_callback is close_deployment_on_failure, dag_id
        assert dag.dagrun_timeout == timedelta(hours=timeout_hours), dag_id


def test_every_downloading_task_takes_one_transfer_pool_slot_per_download_thread(dagbag):
    from inspection_refresh.config import get_settings

    settings = get_settings()
    downloads = [dagbag.dags[dag_id].get_task("download") for dag_id in ("clip_index_normal", "clip_index_defect")]
    prepare = dagbag.dags["patchcore_memory_bank"].get_task("product.prepare")
    for task in [*downloads, prepare]:
        assert task.pool == settings.transfer_pool == "storage_transfers"
    assert [task.pool_slots for task in downloads] == [settings.max_transfers] * 2
    assert prepare.pool_slots == settings.patchcore_transfers <= settings.max_transfers


def test_clip_dags_allow_no_missing_images_unless_asked(dagbag):
    for dag_id in ("clip_index_normal", "clip_index_defect"):
        assert dagbag.dags[dag_id].params["max_missing_images"] == 0


def test_every_dag_can_be_triggered_with_its_default_params(dagbag):
    """The Trigger form submitted unchanged must validate."""
    for dag_id, dag in dagbag.dags.items():
        resolved = dag.params.validate()  # raises ParamValidationError naming the param
        assert set(resolved) == set(dag.params), dag_id


def test_rollback_is_manual_and_never_retries_the_swap(dagbag):
    dag = dagbag.dags["deployment_rollback"]
    assert dag.schedule is None  # triggered by an operator only
    assert [t.task_id for t in dag.tasks] == ["rollback", "register"]
    assert dag.get_task("rollback").retries == 0 and dag.get_task("register").retries >= 1
    assert dict(dag.params) == {"artefact": "clip:normal", "version": "previous", "unpin": False}
    assert "enum" not in dag.params.get_param("artefact").schema


def test_parsing_dag_files_does_not_import_heavy_libraries():
    code = (
        "import sys, json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        "print(json.dumps({'dags': sorted(bag.dags), 'heavy': sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'open_clip', 'faiss', 'torchvision', 'timm'))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ.copy())
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["dags"]) == EXPECTED_DAGS
    assert result["heavy"] == []


def test_an_optional_approval_step_comes_before_every_publish(dagbag):
    from inspection_refresh.operators import APPROVAL_PARAM, PublishApproval

    for dag_id, publish_id in (("clip_index_normal", "publish"), ("clip_index_defect", "publish"),
                               ("patchcore_memory_bank", "product.publish")):
        dag = dagbag.dags[dag_id]
        assert dag.params[APPROVAL_PARAM] is False, f"{dag_id}: approval must be off unless asked for"
        approve = dag.get_task("approve")
        assert isinstance(approve, PublishApproval) and approve.retries == 0
        assert approve.response_timeout is not None and approve.execution_timeout is not None
        assert approve.downstream_task_ids == {publish_id}
        assert "approve" in dag.get_task(publish_id).upstream_task_ids
        assert "Required actions" in dag.doc_md
    assert dagbag.dags["clip_index_normal"].get_task("approve").upstream_task_ids == {"index_save"}
    patchcore_approve = dagbag.dags["patchcore_memory_bank"].get_task("approve")
    assert patchcore_approve.upstream_task_ids == {"product.build"}
    assert patchcore_approve.trigger_rule == "all_done"  # one failed product does not block the others
    # each product still publishes only after its own build succeeded
    assert "product.build" in dagbag.dags["patchcore_memory_bank"].get_task("product.publish").upstream_task_ids


def test_heavy_tasks_go_to_the_heavy_queue_and_the_rest_to_the_default_one():
    """INSPECTION_HEAVY_QUEUE / INSPECTION_DEFAULT_QUEUE route every task (parsed in a fresh process)."""
    code = (
        "import json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        "print(json.dumps({f'{d.dag_id}.{t.task_id}': t.queue for d in bag.dags.values() for t in d.tasks}))\n"
    )
    env = {**os.environ, "INSPECTION_HEAVY_QUEUE": "gpu", "INSPECTION_DEFAULT_QUEUE": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    queues = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = {"clip_index_normal.embed", "clip_index_defect.embed", "patchcore_memory_bank.product.build"}
    assert {task for task, queue in queues.items() if queue == "gpu"} == heavy
    assert {queue for task, queue in queues.items() if task not in heavy} == {"cpu"}
    assert len(queues) == 2 * 6 + 6 + 2  # every task of every DAG


# ------------------------------------------------------------------ schedules: slots, never a missed one


def _serialized(dag):
    """``dag`` as the scheduler sees it: serialized and read back (the timetable through the plugin's registry)."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(DagSerialization.to_dict(dag))


def _run_info(when):
    """A scheduled run at ``when``, as the scheduler hands it to the timetable."""
    from airflow.timetables.base import DagRunInfo

    return DagRunInfo.interval(when, when)


def _daily_slot_hours_ago(hours: float):
    """A daily cron whose slot today was ``hours`` ago (to the minute), and that slot."""
    import pendulum

    slot = pendulum.now("UTC").subtract(minutes=int(hours * 60)).replace(second=0, microsecond=0)
    return f"{slot.minute} {slot.hour} * * *", slot


def test_unpausing_starts_no_run_for_a_missed_slot_and_scheduled_runs_keep_their_slots(monkeypatch):
    """What the scheduler computes for the next run (the DAG processor re-computes it while the DAG is paused):
    Airflow's own CronTriggerTimetable offers today's missed slot at once, ours the next slot."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.timetables.trigger import CronTriggerTimetable
    from inspection_refresh.schedules import SlotsOnlyTimetable

    cron, missed = _daily_slot_hours_ago(3)
    monkeypatch.setenv("INSPECTION_CLIP_SCHEDULE", cron)
    dag = _serialized(DagBag(dag_folder=str(REPO / "dags")).dags["clip_index_normal"])
    assert isinstance(dag.timetable, SlotsOnlyTimetable) and dag.timetable.summary == cron
    last_run_long_ago = _run_info(missed.subtract(days=10))
    for last in (last_run_long_ago, None):  # paused for days; or never run
        assert dag.next_dagrun_info(last_automated_run_info=last).run_after == missed.add(days=1)

    builtin = CronTriggerTimetable(cron, timezone="UTC")  # why: it would start the missed slot's run at once
    from airflow.timetables.base import TimeRestriction

    restriction = TimeRestriction(earliest=missed.subtract(days=30), latest=None, catchup=False)
    assert builtin.next_dagrun_info(last_automated_data_interval=last_run_long_ago.data_interval,
                                    restriction=restriction).run_after == missed

    # Scheduled runs stay at their slots: the next one after a run is the next slot, and a slot reached a
    # moment ago (the scheduler is a little late) still gets its run.
    assert dag.next_dagrun_info(last_automated_run_info=_run_info(missed)).run_after == missed.add(
        days=1)
    just_now_cron, just_now = _daily_slot_hours_ago(1 / 60)
    monkeypatch.setenv("INSPECTION_CLIP_SCHEDULE", just_now_cron)
    dag = _serialized(DagBag(dag_folder=str(REPO / "dags")).dags["clip_index_normal"])
    yesterday = _run_info(just_now.subtract(days=1))
    assert dag.next_dagrun_info(last_automated_run_info=yesterday).run_after == just_now


@pytest.mark.parametrize(("setting", "expected"), [
    ("none", None), ("@once", "OnceTimetable"), ("@daily", "SlotsOnlyTimetable"), ("*/15 * * * *", "SlotsOnlyTimetable"),
])
def test_every_schedule_setting_gives_a_dag_the_scheduler_can_read(setting, expected, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("INSPECTION_PATCHCORE_SCHEDULE", setting)
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors
    dag = _serialized(bag.dags["patchcore_memory_bank"])
    assert (type(dag.timetable).__name__ if dag.timetable.can_be_scheduled else None) == expected


def test_the_trigger_form_refuses_malformed_product_codes_and_bad_ranges_but_not_an_empty_list(dagbag):
    """What Airflow checks when a run is triggered (the form and the REST API validate the conf against the params):
    a product code that cannot be one, or a number out of range, is refused before any run starts."""
    import copy

    from airflow.sdk.definitions.param import ParamValidationError

    dag = dagbag.dags["patchcore_memory_bank"]
    products = dag.params.get_param("products").schema
    assert "null" in products["type"]  # the UI marks a param required unless its type allows null

    def validate(conf: dict, of=dag) -> dict:
        params = copy.deepcopy(of.params)
        params.update(conf)  # validates each value set
        return params.validate()

    assert validate({"products": None})["products"] is None and validate({"products": []})["products"] == []
    assert validate({"products": ["TEX01", "11"]})["products"] == ["TEX01", "11"]
    for bad in ({"products": ["TEX 01"]}, {"products": ["TEX01;DROP"]}, {"products": [""]},
                {"coreset": 0}, {"stride": 9}, {"shorter": 16}, {"layers": []}, {"weights": ""}):
        with pytest.raises(ParamValidationError):
            validate(bad)
    clip = dagbag.dags["clip_index_normal"]
    for bad in ({"batch_size": 0}, {"max_missing_images": -1}, {"prefix": ""}):
        with pytest.raises(ParamValidationError):
            validate(bad, clip)
