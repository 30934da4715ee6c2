"""Settings of the multi-worker set-up: the run store and the queues tasks are routed to."""

from __future__ import annotations

import pytest

from inspection_refresh.config import get_settings


def test_defaults_keep_the_single_host_set_up(monkeypatch):
    for name in ("RUN_STORE", "RUN_STORE_PREFIX", "RUN_RETENTION_DAYS", "HEAVY_QUEUE", "DEFAULT_QUEUE"):
        monkeypatch.delenv(f"INSPECTION_{name}", raising=False)
    settings = get_settings()
    assert settings.run_store == "local" and settings.run_store_prefix == "airflow-runs/"
    assert settings.run_retention_days == 14
    assert settings.queue_args(heavy=True) == settings.queue_args() == {}  # Airflow's default queue


@pytest.mark.parametrize("heavy, default, heavy_args, other_args", [
    ("gpu", "", {"queue": "gpu"}, {}),
    ("gpu", "cpu", {"queue": "gpu"}, {"queue": "cpu"}),
    ("", "cpu", {"queue": "cpu"}, {"queue": "cpu"}),
    ("none", "none", {}, {}),
])
def test_heavy_tasks_go_to_the_heavy_queue_and_the_rest_to_the_default_one(monkeypatch, heavy, default, heavy_args,
                                                                          other_args):
    monkeypatch.setenv("INSPECTION_HEAVY_QUEUE", heavy)
    monkeypatch.setenv("INSPECTION_DEFAULT_QUEUE", default)
    settings = get_settings()
    assert settings.queue_args(heavy=True) == heavy_args
    assert settings.queue_args() == other_args


def test_run_store_settings_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("INSPECTION_RUN_STORE", " Storage ")
    monkeypatch.setenv("INSPECTION_RUN_STORE_PREFIX", "runs/")
    monkeypatch.setenv("INSPECTION_RUN_RETENTION_DAYS", "2.5")
    settings = get_settings()
    assert (settings.run_store, settings.run_store_prefix, settings.run_retention_days) == ("storage", "runs/", 2.5)
