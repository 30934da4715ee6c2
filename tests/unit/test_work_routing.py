"""Settings of the multi-worker set-up: the run store and the queues tasks are routed to."""

from __future__ import annotations

import pytest
from inspection_refresh.config import get_settings
from inspection_refresh.operators import executor_args, queue_args


def test_defaults_keep_the_single_host_set_up(monkeypatch):
    for name in ("RUN_STORE", "RUN_STORE_PREFIX", "RUN_RETENTION_DAYS", "HEAVY_QUEUE", "DEFAULT_QUEUE"):
        monkeypatch.delenv(f"INSPECTION_{name}", raising=False)
    settings = get_settings()
    assert settings.run_store == "local" and settings.run_store_prefix == "airflow-runs/"
    assert settings.run_retention_days == 14
    assert queue_args(settings, heavy=True) == queue_args(settings) == {}  # Airflow's default queue


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
    assert queue_args(settings, heavy=True) == heavy_args
    assert queue_args(settings) == other_args


def test_run_store_settings_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("INSPECTION_RUN_STORE", " Storage ")
    monkeypatch.setenv("INSPECTION_RUN_STORE_PREFIX", "runs/")
    monkeypatch.setenv("INSPECTION_RUN_RETENTION_DAYS", "2.5")
    settings = get_settings()
    assert (settings.run_store, settings.run_store_prefix, settings.run_retention_days) == ("storage", "runs/", 2.5)


def test_mirror_transfers_default_and_cap(monkeypatch):
    monkeypatch.delenv("INSPECTION_MIRROR_TRANSFERS", raising=False)
    monkeypatch.setenv("INSPECTION_MAX_TRANSFERS", "10")
    assert get_settings().mirror_transfers == 4
    monkeypatch.setenv("INSPECTION_MIRROR_TRANSFERS", "50")
    assert get_settings().mirror_transfers == 10  # never more than the storage's cap
    monkeypatch.setenv("INSPECTION_MIRROR_TRANSFERS", "0")
    assert get_settings().mirror_transfers == 1


@pytest.mark.parametrize("value", [None, "", "none", "0"])
def test_no_gpu_pod_override_unless_asked(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("INSPECTION_HEAVY_POD_GPUS", raising=False)
    else:
        monkeypatch.setenv("INSPECTION_HEAVY_POD_GPUS", value)
    settings = get_settings()
    assert settings.heavy_pod_gpus is None
    assert executor_args(settings, heavy=True) == executor_args(settings) == {}


def test_heavy_tasks_request_gpus_from_kubernetes_when_asked(monkeypatch):
    monkeypatch.setenv("INSPECTION_HEAVY_POD_GPUS", "2")
    settings = get_settings()
    assert settings.heavy_pod_gpus == 2 and executor_args(settings) == {}  # light tasks: nothing
    try:
        import kubernetes  # noqa: F401  (the KubernetesExecutor's provider brings it)
    except ImportError:
        with pytest.raises(RuntimeError, match="kubernetes client is not installed"):
            executor_args(settings, heavy=True)
        return
    pod = executor_args(settings, heavy=True)["executor_config"]["pod_override"]
    (container,) = pod.spec.containers
    assert container.name == "base"  # the container Airflow's pod template runs the task in
    assert container.resources.limits == container.resources.requests == {"nvidia.com/gpu": "2"}
