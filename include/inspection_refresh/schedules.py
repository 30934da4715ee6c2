"""When the deployment DAGs run by themselves: at their cron slots, and never for a slot already missed.

Airflow's ``CronTriggerTimetable`` with ``catchup=False`` always offers the most recent past slot
(``run_immediately`` only chooses the first run of a DAG without a ``start_date``): a DAG unpaused
at 10:00 with a 02:00 schedule starts "today's" 02:00 run at once, and with ``max_active_runs=1``
the run the operator triggered waits behind it. :class:`SlotsOnlyTimetable` offers a past slot
only within :data:`LATE_START_GRACE` of it (a scheduler a little late still starts the run of the
slot it just reached); else the next slot.

A custom timetable must be registered with Airflow: ``plugins/deployment_schedule.py`` does it for
the scheduler, DAG processor and API server. Imported at DAG parse time: light.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

try:
    from airflow.timetables.base import DagRunInfo, DataInterval, TimeRestriction
    from airflow.timetables.trigger import CronTriggerTimetable
except ImportError:  # a worker with the Task SDK only: it parses DAGs to run tasks, never to schedule them
    CronTriggerTimetable = None  # type: ignore[assignment,misc]

LATE_START_GRACE = timedelta(minutes=5)
"""How late after its slot a scheduled run may still start: the scheduler's own delay, not a catch-up."""

NOT_CRON = frozenset({"@once", "@continuous"})
"""Schedules Airflow does not read as cron: passed to the DAG unchanged."""


class SlotsOnlyTimetable(CronTriggerTimetable or object):  # type: ignore[misc]
    """A ``CronTriggerTimetable`` that, without catch-up, runs the next slot rather than a missed one."""

    def next_dagrun_info(self, *, last_automated_data_interval: DataInterval | None,
                         restriction: TimeRestriction) -> DagRunInfo | None:
        if restriction.catchup:
            return super().next_dagrun_info(last_automated_data_interval=last_automated_data_interval,
                                            restriction=restriction)
        from airflow._shared.timezones.timezone import coerce_datetime, utcnow

        candidates = [self._align_to_next(coerce_datetime(utcnow()) - LATE_START_GRACE)]
        if last_automated_data_interval is not None:
            candidates.append(self._get_next(last_automated_data_interval.end))
        if restriction.earliest is not None:
            candidates.append(self._align_to_next(restriction.earliest))
        start = max(candidates)
        if restriction.latest is not None and restriction.latest < start:
            return None
        return DagRunInfo.interval(coerce_datetime(start - self._interval), start)


def deployment_schedule(expression: str | None, timezone: str = "UTC") -> Any:
    """A deployment DAG's ``schedule`` from a setting (``clip_schedule``, ``patchcore_schedule``): ``None``
    (manual runs only), ``@once``/``@continuous`` as they are, any cron expression or preset (``@daily``)
    as a :class:`SlotsOnlyTimetable` in ``timezone`` (the DAGs' ``start_date`` is UTC)."""
    if expression is None or expression in NOT_CRON or CronTriggerTimetable is None:
        return expression
    return SlotsOnlyTimetable(expression, timezone=timezone)
