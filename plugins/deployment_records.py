"""Registers ``inspection_refresh.listeners``: a run an operator marks failed or success closes its
``deployment_logs`` row, and a run whose pools are missing fails as it starts. Must be in the plugins
folder of the API server (where Airflow calls the listener for runs marked through the UI or REST API)
and of the scheduler (which calls it when a run starts); the logic lives in the library."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from inspection_refresh import listeners as deployment_record_listener


class DeploymentRecordsPlugin(AirflowPlugin):
    name = "inspection_refresh_deployment_records"
    listeners = [deployment_record_listener]
