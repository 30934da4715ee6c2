"""Run a DAG of this repository through Airflow's ``dag.test()`` and read back what happened; the fresh
bucket, published roots and products table each DAG test runs against (:func:`clip_dag_env`,
:func:`patchcore_dag_env`, for the ``env`` fixtures of the CLIP and PatchCore DAG tests)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.samples import sample_jpeg

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


def _fresh_bucket(prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A new bucket ``<prefix>-<random>`` as ``INSPECTION_BUCKET``, and a cache root of the test's own."""
    from inspection_refresh import compose

    bucket = f"{prefix}-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("INSPECTION_BUCKET", bucket)
    monkeypatch.setenv("INSPECTION_CACHE_ROOT", str(tmp_path / "cache"))
    storage = compose.object_storage(bucket=bucket)
    storage.client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "kr-standard"})
    return storage


def _dag_env(storage: Any, root: Path, sql: Callable[..., list[dict]]) -> dict[str, Any]:
    """What a DAG test works with: ``storage``, ``put(key, body)`` into its bucket, the published ``root``,
    ``releases`` beside it, ``sql``."""
    from inspection_refresh.config import default_releases_dir

    def put(key: str, body: bytes) -> None:
        storage.client.put_object(Bucket=storage.bucket, Key=key, Body=body)

    return {"storage": storage, "put": put, "root": root, "releases": default_releases_dir(root), "sql": sql}


def clip_dag_env(prefix: str, checkpoint: Path, sql: Callable[..., list[dict]], tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fresh bucket, index root and cache for one CLIP DAG test; products 1 and 2 in the products table.

    ``checkpoint`` is the ``clip_checkpoint`` fixture's random-init CLIP weights; ``sql`` the ``sql`` fixture.
    """
    from inspection_refresh.registry import CREATE_PRODUCTS

    monkeypatch.setenv("INSPECTION_INDEX_ROOT", str(tmp_path / "clip_index"))
    monkeypatch.setenv("INSPECTION_CLIP_PRETRAINED", str(checkpoint))
    storage = _fresh_bucket(prefix, tmp_path, monkeypatch)
    sql(CREATE_PRODUCTS)
    sql("INSERT IGNORE INTO products (product_id, product_code, product_name) VALUES "
        "(1, 'BRKT01', 'Bracket'), (2, 'FABR02', 'Fabric')")
    return _dag_env(storage, tmp_path / "clip_index", sql)


@contextmanager
def patchcore_dag_env(prefix: str, products: str, sql: Callable[..., list[dict]], tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A fresh bucket, PatchCore root and cache for one PatchCore DAG test; TEX01 (product 11) with 8 normal
    and 3 defect images; a products table of its own holding ``products`` (SQL ``VALUES`` of product_id,
    product_code, product_name, is_active), dropped afterwards: the DAG builds every active product.
    """
    from inspection_refresh.registry import CREATE_PRODUCTS

    monkeypatch.setenv("INSPECTION_PATCHCORE_ROOT", str(tmp_path / "patchCore"))
    storage = _fresh_bucket(prefix, tmp_path, monkeypatch)
    sql("DROP TABLE IF EXISTS products")
    sql(CREATE_PRODUCTS)
    sql("INSERT INTO products (product_id, product_code, product_name, is_active) VALUES " + products)
    env = _dag_env(storage, tmp_path / "patchCore", sql)
    for seq in range(8):
        env["put"](f"images/normal/11/TEX01_OK_{seq:03d}.jpg", sample_jpeg(0, seq))
    for type_id, defect in enumerate(("scratch", "hole", "stain"), start=1):
        env["put"](f"images/defect/11_{type_id}/TEX01_D{type_id}_001.jpg", sample_jpeg(0, 500 + type_id, defect))
    yield env
    sql("DROP TABLE products")
