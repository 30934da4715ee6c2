"""A real multi-worker Airflow for tests: CeleryExecutor, a Redis broker, a PostgreSQL metadata database.

:class:`CeleryCluster` runs, in a temporary AIRFLOW_HOME, what production runs on several machines:
``airflow api-server`` (tasks reach the execution API through it; the tests drive the REST API as the
UI does), ``airflow scheduler`` (CeleryExecutor), ``airflow dag-processor`` and one ``airflow celery
worker`` per :class:`WorkerSpec`, each with its own Celery hostname, queues, concurrency 1 and
``INSPECTION_CACHE_ROOT``, ``INSPECTION_INDEX_ROOT`` and ``INSPECTION_PATCHCORE_ROOT`` (releases
directories beside them) under ``home/workers/<name>/``, standing in for a separate machine's disk.
Task instances record the worker's name as their ``hostname`` (``tests/integration/worker_hostname.py``).

* Broker: a private database number on the Redis at 127.0.0.1:6379 (claimed with SET NX, flushed
  afterwards) or, when none answers, a ``redis-server`` of its own on a free port.
* Metadata DB and Celery result backend: a scratch database on the PostgreSQL at 127.0.0.1:5432
  (user ``postgres``, trust authentication, as this project's machines run it; ``INSPECTION_POSTGRES_HOST``,
  ``_PORT``, ``_USER`` and ``_PASSWORD`` override it, as ``scripts/test.sh`` exports them when it had to start
  a private cluster: ``ensure_postgres`` in ``scripts/lib.sh``), through psycopg 3 for both Airflow's
  sync and async engines; the tests are skipped when no PostgreSQL answers. Not SQLite, which allows one writer at a time across these processes, and not
  MariaDB: Airflow 3.3 migrates a MariaDB 10.11 database, but its scheduler dies about a minute later
  on the asset clean-up's ``WITH ... DELETE ... RETURNING`` (MariaDB error 1064).
* :meth:`CeleryCluster.kill_worker` kills a worker's whole process tree (Celery main process, pool
  child, task supervisor, task) with SIGKILL, as a crashed machine would; the scheduler fails the
  orphaned try after ``heartbeat_timeout`` seconds and Airflow retries it on a worker that serves its
  queue (:meth:`CeleryCluster.start_worker` adds one).

Starting, waiting for and stopping the processes, and the REST API calls, are the shared harness's
(:class:`~tests.integration.airflow_processes.AirflowProcesses`). Everything is stopped at the end: each
component is the leader of its own session, and the session with all its descendants gets SIGTERM, then
SIGKILL (``inspection_refresh.dev.process_tree``).
Start-up (``db migrate`` of a fresh PostgreSQL database, then every component until the API server
answers and each worker answers a Celery ping) measured on the 2-core development machine: 17-21 s
(``CeleryCluster.startup_seconds``, logged), and about 5-10 s to stop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from inspection_refresh.dev.process_tree import session_members

from tests.conftest import _free_port, _wait_for_port
from tests.integration.airflow_processes import AirflowProcesses, wait_until

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
TEST_DAGS = REPO / "tests" / "celery_dags"


@dataclass(frozen=True)
class WorkerSpec:
    """One ``airflow celery worker``: ``name`` is its Celery hostname and what its tasks record as ``hostname``."""

    name: str
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 1


DEFAULT_WORKERS = (WorkerSpec("worker-default", ("default",)), WorkerSpec("worker-gpu", ("gpu",)))


class RedisBroker:
    """A Redis database no one else uses: a free database number on ``host:port``, else a private server."""

    CLAIM = "inspection-celery-harness:claim"

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int = 6379) -> None:
        self.workdir, self.host, self.port = workdir, host, port
        self.db: int | None = None
        self.process: subprocess.Popen | None = None
        self.token = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"

    def start(self) -> str:
        import redis

        try:
            self.db = self._claim_free_db()
        except redis.RedisError as exc:
            log.info("No usable Redis on %s:%s (%s); starting a private redis-server", self.host, self.port, exc)
            self._start_private_server()
            self.db = 0
        return self.url

    def _claim_free_db(self) -> int:
        import redis

        server = redis.Redis(self.host, self.port, socket_timeout=2)
        server.ping()
        try:
            databases = int(server.config_get("databases").get("databases", 16))
        except redis.RedisError:
            databases = 16
        for db in range(databases - 1, 0, -1):  # db 0 is everyone's default: never taken
            client = redis.Redis(self.host, self.port, db=db, socket_timeout=2)
            if client.set(self.CLAIM, self.token, nx=True, ex=6 * 3600):
                if client.dbsize() == 1:
                    return db
                client.delete(self.CLAIM)  # someone's data is there
        raise redis.RedisError(f"no empty database on {self.host}:{self.port}")

    def _start_private_server(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("no Redis answers on 127.0.0.1:6379 and redis-server is not installed "
                               "(scripts/test.sh installs it: apt-get install redis-server)")
        self.host, self.port = "127.0.0.1", _free_port()
        with open(self.workdir / "redis.log", "wb") as out:
            self.process = subprocess.Popen(
                [server, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
        elif self.db is not None:
            import redis

            client = redis.Redis(self.host, self.port, db=self.db, socket_timeout=5)
            if client.get(self.CLAIM) == self.token.encode():
                client.flushdb()


def postgres_server() -> dict[str, Any]:
    """Where scratch databases go: ``INSPECTION_POSTGRES_HOST/PORT/USER/PASSWORD``, default the local trust set-up."""
    return {"host": os.environ.get("INSPECTION_POSTGRES_HOST", "127.0.0.1"),
            "port": int(os.environ.get("INSPECTION_POSTGRES_PORT", "5432")),
            "user": os.environ.get("INSPECTION_POSTGRES_USER", "postgres"),
            "password": os.environ.get("INSPECTION_POSTGRES_PASSWORD", "")}


class PostgresDatabase:
    """A scratch PostgreSQL database for Airflow's metadata and Celery's results, dropped afterwards."""

    def __init__(self, server: dict[str, Any] | None = None) -> None:
        self.server = server or postgres_server()
        self.name = f"airflow_celery_{uuid.uuid4().hex[:10]}"

    def url(self, driver: str = "psycopg") -> str:
        """SQLAlchemy URL: ``psycopg`` for ``sql_alchemy_conn``, ``psycopg_async`` for ``sql_alchemy_conn_async``."""
        credentials = quote(self.server["user"], safe="")
        if self.server["password"]:
            credentials += ":" + quote(self.server["password"], safe="")
        return f"postgresql+{driver}://{credentials}@{self.server['host']}:{self.server['port']}/{self.name}"

    def _execute(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=5, **self.server) as conn:
            conn.execute(statement)

    def available(self) -> str | None:
        """``None`` when the server answers, else why not."""
        try:
            self._execute("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - any reason means: no server for these tests
            return (f"no PostgreSQL at {self.server['user']}@{self.server['host']}:{self.server['port']} "
                    f"({type(exc).__name__}: {str(exc).strip()[:200]}); set INSPECTION_POSTGRES_*")
        return None

    def create(self) -> None:
        self._execute(f'CREATE DATABASE "{self.name}" ENCODING \'UTF8\' TEMPLATE template0')

    def drop(self) -> None:
        self._execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@dataclass
class CeleryCluster(AirflowProcesses):
    """API server, scheduler, DAG processor and Celery workers of one AIRFLOW_HOME, driven through the REST API."""

    broker_url: str
    database: PostgresDatabase
    dags_folder: Path = TEST_DAGS
    workers: tuple[WorkerSpec, ...] = DEFAULT_WORKERS
    heartbeat_timeout: int = 20
    """Seconds without a heartbeat after which the scheduler fails a task try (a killed worker's)."""
    startup_seconds: float = 0.0

    def executor_env(self) -> dict[str, str]:
        """CeleryExecutor, the PostgreSQL metadata DB and result backend, the test DAGs; the worker's name as
        each task's ``hostname``, a short heartbeat timeout (a worker kill is noticed in seconds)."""
        return {
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database.url("psycopg"),
            # Airflow would derive postgresql+asyncpg, a driver this venv does not need.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": self.database.url("psycopg_async"),
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.database.url("psycopg"),
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.integration.worker_hostname.hostname",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(self.heartbeat_timeout),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }

    # -- life cycle -------------------------------------------------------------------
    def start(self, *, before: Iterable[Sequence[str]] = (), api_timeout: float = 180) -> None:
        """Also wait until each worker answers a Celery ping; sets ``startup_seconds``."""
        began = time.monotonic()
        super().start(before=before, api_timeout=api_timeout)
        for spec in self.workers:
            self.wait_for_worker(spec.name)
        self.startup_seconds = time.monotonic() - began
        log.info("Celery cluster up in %.1fs: %s", self.startup_seconds, ", ".join(self.processes))

    def start_components(self) -> None:
        """Also the workers, not waited for: they start while the API server does."""
        super().start_components()
        for spec in self.workers:
            self.start_worker(spec, wait=False)

    def start_worker(self, spec: WorkerSpec, *, wait: bool = True) -> None:
        """Start ``airflow celery worker`` for ``spec`` (its own cache and published roots under ``home/workers/<name>``)."""
        workdir = self.home / "workers" / spec.name
        workdir.mkdir(parents=True, exist_ok=True)
        env = {name: value for name, value in self.env.items()
               if name not in ("INSPECTION_INDEX_RELEASES", "INSPECTION_PATCHCORE_RELEASES")}  # beside the roots
        env = {**env, "INSPECTION_CACHE_ROOT": str(self.cache_root(spec.name)),
               "INSPECTION_INDEX_ROOT": str(workdir / "clip_index"),
               "INSPECTION_PATCHCORE_ROOT": str(workdir / "patchCore"),
               "INSPECTION_TEST_HOSTNAME": spec.name, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port())}
        self.spawn(spec.name, ["celery", "worker", "--celery-hostname", spec.name, "--queues", ",".join(spec.queues),
                                "--concurrency", str(spec.concurrency), "--skip-serve-logs",
                                "--pid", str(workdir / "worker.pid")], env)
        if spec not in self.workers:
            self.workers = (*self.workers, spec)
        if wait:
            self.wait_for_worker(spec.name)

    def cache_root(self, worker: str) -> Path:
        """The ``INSPECTION_CACHE_ROOT`` of ``worker`` (its "own disk")."""
        return self.home / "workers" / worker / "cache"

    def wait_for_worker(self, name: str, timeout: float = 180) -> None:
        """Until the worker answers a Celery ping through the broker."""
        from celery import Celery

        app = Celery(broker=self.broker_url)
        try:
            wait_until(lambda: self.check_alive() and app.control.ping(destination=[f"celery@{name}"], timeout=1),
                       timeout, f"Celery worker {name} ({self.home / (name + '.log')})", 0.5)
        finally:
            app.close()

    # -- faults -------------------------------------------------------------------------
    def worker_processes(self, name: str) -> list:
        """The live processes of worker ``name``: Celery main and pool processes, task supervisors and tasks."""
        return list(session_members(self.processes[name].pid, self.started_at[name]).values())

    def kill_worker(self, name: str) -> list:
        """``kill -9`` worker ``name``'s whole process tree at once, as if its machine died; returns the processes."""
        import psutil

        members = self.worker_processes(name)
        for process in members:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(members, timeout=10)
        self.processes[name].wait(10)
        self.killed.add(name)
        return members

    # -- REST API -----------------------------------------------------------------------
    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        entry = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                         params={"deserialize": "true"})
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) else value


@contextmanager
def running_cluster(home: Path, **options: Any) -> Iterator[CeleryCluster]:
    """A started :class:`CeleryCluster` in ``home`` (``options`` are its fields), torn down whatever happens.

    Skips the calling test when no PostgreSQL answers (see :func:`postgres_server`).
    """
    database = PostgresDatabase()
    missing = database.available()
    if missing:
        pytest.skip(f"the Celery harness needs PostgreSQL for Airflow's metadata DB: {missing}")
    broker = RedisBroker(home)
    cluster = None
    try:
        broker.start()
        database.create()
        cluster = CeleryCluster(home, broker.url, database, **options)
        cluster.start()
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        database.drop()
        broker.stop()


@pytest.fixture(scope="module")
def celery_cluster(tmp_path_factory) -> Iterator[CeleryCluster]:
    """The test DAGs (tests/celery_dags) on a CeleryExecutor Airflow with workers ``worker-default``
    (queue ``default``) and ``worker-gpu`` (queue ``gpu``)."""
    with running_cluster(tmp_path_factory.mktemp("celery-airflow")) as cluster:
        yield cluster
