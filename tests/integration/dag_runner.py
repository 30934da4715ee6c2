"""Run a DAG of this repository through Airflow's ``dag.test()`` and read back what happened."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class DagRunResult:
    state: str
    run_id: str
    task_states: dict[str, str]
    """task_id (``task_id[map_index]`` for mapped tasks) -> final state."""
    labels: dict[str, str | None]
    """``task_id[map_index]`` -> the label the UI shows for that mapped task instance."""


def run_dag(dag_id: str, conf: dict | None = None, logical_date: datetime | None = None) -> DagRunResult:
    """Run ``dag_id`` once; runs of different DAGs at the same ``logical_date`` share one run id."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag(dag_id)
    when = {"logical_date": logical_date, "run_after": logical_date} if logical_date else {}
    dag_run = dag.test(run_conf=conf or {}, **when)
    with create_session() as session:
        tis = session.query(TaskInstance).filter(
            TaskInstance.dag_id == dag_id, TaskInstance.run_id == dag_run.run_id).all()
        states = {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(ti.state)
                  for ti in tis}
        labels = {f"{ti.task_id}[{ti.map_index}]": ti.rendered_map_index for ti in tis if ti.map_index >= 0}
    return DagRunResult(state=str(dag_run.state), run_id=dag_run.run_id, task_states=states, labels=labels)


def asset_events(asset_name: str) -> list[dict]:
    """Extras of the asset events recorded for ``asset_name``, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                .filter(AssetModel.name == asset_name).order_by(AssetEvent.id).all())
        return [dict(row.extra or {}) for row in rows]
