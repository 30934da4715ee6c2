"""The hostname Airflow records for a task run by the Celery test harness (``[core] hostname_callable``).

Every worker of ``tests/integration/celery_cluster.py`` runs on this one machine, so the real host name
cannot tell them apart; each gets ``INSPECTION_TEST_HOSTNAME`` (its Celery hostname) instead, and task
instances record it in their ``hostname`` as they would a separate machine's name. Other processes
(scheduler, API server) keep the machine's fully qualified name. No imports beyond the standard library:
every Airflow process of the harness imports this.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("INSPECTION_TEST_HOSTNAME") or socket.getfqdn()
