"""Registers the deployment DAGs' timetable (``inspection_refresh.schedules.SlotsOnlyTimetable``: cron slots,
never a run for a slot missed while paused) and the listener that puts the line the tasks left on a finished
run's page as its note (``inspection_refresh.run_notes``). Must be in the plugins folder of the scheduler, the
DAG processor and the API server: Airflow refuses a DAG whose timetable no plugin registers."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from inspection_refresh import run_notes
from inspection_refresh.schedules import SlotsOnlyTimetable


class DeploymentSchedulePlugin(AirflowPlugin):
    name = "inspection_refresh_deployment_schedule"
    timetables = [SlotsOnlyTimetable]
    listeners = [run_notes]
