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

Everything is stopped at the end: each component is the leader of its own session, and the session
with all its descendants gets SIGTERM, then SIGKILL (``inspection_refresh.dev.process_tree``).
Start-up (``db migrate`` of a fresh PostgreSQL database, then every component until the API server
answers and each worker answers a Celery ping) measured on the 2-core development machine: 17-21 s
(``CeleryCluster.startup_seconds``, logged), and about 5-10 s to stop.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from inspection_refresh.dev.process_tree import session_members, stop_session
from tests.integration.test_real_scheduler import _free_port, task_process, wait_until

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
TEST_DAGS = REPO / "tests" / "celery_dags"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
RUN_TIMEOUT_S = 240


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
        from tests.conftest import _wait_for_port

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
class CeleryCluster:
    """API server, scheduler, DAG processor and Celery workers of one AIRFLOW_HOME, driven through the REST API."""

    home: Path
    broker_url: str
    database: PostgresDatabase
    dags_folder: Path = TEST_DAGS
    workers: tuple[WorkerSpec, ...] = DEFAULT_WORKERS
    extra_env: dict[str, str] = field(default_factory=dict)
    heartbeat_timeout: int = 20
    """Seconds without a heartbeat after which the scheduler fails a task try (a killed worker's)."""
    port: int = field(default_factory=_free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)
    token: str = ""
    startup_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment every component shares (a worker adds its own on top)."""
        return {
            **os.environ,  # AIRFLOW_CONN_* and INSPECTION_* of the test session, plugins folder
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database.url("psycopg"),
            # Airflow would derive postgresql+asyncpg, a driver this venv does not need.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": self.database.url("psycopg_async"),
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.database.url("psycopg"),
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.integration.worker_hostname.hostname",
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt"),
            "AIRFLOW__API__SECRET_KEY": self._secret("api"),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(self.heartbeat_timeout),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            **self.extra_env,
        }

    def _secret(self, name: str) -> str:
        path = self.home / f".{name}-secret"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
        return path.read_text()

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        """Migrate the metadata DB, start every component and wait until DAGs can run; sets ``startup_seconds``."""
        began = time.monotonic()
        self.cli("db", "migrate")
        self._spawn("api-server", ["api-server", "--port", str(self.port), "--workers", "1"])
        self._spawn("scheduler", ["scheduler"])
        self._spawn("dag-processor", ["dag-processor"])
        for spec in self.workers:
            self.start_worker(spec, wait=False)
        wait_until(self._api_answers, 180, f"the API server on {self.url} ({self.home / 'api-server.log'})", 1)
        self.token = self.api("GET", "/auth/token")["access_token"]
        for spec in self.workers:
            self.wait_for_worker(spec.name)
        self.startup_seconds = time.monotonic() - began
        log.info("Celery cluster up in %.1fs: %s", self.startup_seconds, ", ".join(self.processes))

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.home / f"{name}.log", "ab") as out:
            # Own session: stop() signals each component with everything it started.
            self.started_at[name] = time.time()
            self.processes[name] = subprocess.Popen([AIRFLOW, *args], env=env or self.env, stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True)

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
        self._spawn(spec.name, ["celery", "worker", "--celery-hostname", spec.name, "--queues", ",".join(spec.queues),
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

    def check_alive(self) -> bool:
        """Raise if a component (other than a worker :meth:`kill_worker` killed) has exited; else True."""
        dead = [f"{name} (exit {process.returncode}, see {self.home / (name + '.log')})"
                for name, process in self.processes.items() if name not in self.killed and process.poll() is not None]
        if dead:
            raise AssertionError(f"Airflow component(s) died: {'; '.join(dead)}")
        return True

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every component's session and descendants, SIGKILL what is left after ``grace`` s (in parallel)."""
        def stop_one(name: str) -> None:
            stop_session(self.processes[name].pid, self.started_at[name], grace=grace)
            self.processes[name].wait(10)

        threads = [threading.Thread(target=stop_one, args=(name,)) for name in self.processes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

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
    def cli(self, *args: str) -> None:
        result = subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=300)
        output = result.stdout[-3000:] + result.stderr[-3000:]
        assert result.returncode == 0, f"airflow {' '.join(args)} failed:\n{output}"

    def _api_answers(self) -> bool:
        import httpx

        self.check_alive()
        try:
            return httpx.get(f"{self.url}/api/v2/version", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    def api(self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        response = httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)
        if missing_ok and response.status_code == 404:
            return None
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def unpause(self, dag_id: str, timeout: float = 180) -> None:
        """Wait until the DAG processor has parsed ``dag_id``, then unpause it."""
        wait_until(lambda: self.api("GET", f"/api/v2/dags/{dag_id}", missing_ok=True), timeout,
                   f"the DAG processor to parse {dag_id} ({self.home / 'dag-processor.log'})", 1)
        self.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        body = {"logical_date": None, **({"conf": conf} if conf else {})}
        return self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        self.check_alive()
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def wait_for_end(self, dag_id: str, run_id: str, timeout: float = RUN_TIMEOUT_S) -> str:
        return wait_until(lambda: (state := self.run_state(dag_id, run_id)) in ("success", "failed") and state,
                          timeout, f"{dag_id} run {run_id} to end ({self.home}/*.log)", 0.5)

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        """Task id -> the API's task instance (``state``, ``hostname``, ``queue``, ``try_number``, ...)."""
        listing = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti for ti in listing["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        entry = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                         params={"deserialize": "true"})
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) else value

    def running_task(self, dag_id: str, run_id: str, task_id: str, timeout: float = RUN_TIMEOUT_S):
        """(task instance, the task's process) as soon as ``task_id`` runs."""
        def find():
            ti = self.task_instances(dag_id, run_id).get(task_id, {})
            process = ti.get("state") == "running" and task_process(ti["id"])
            return process and (ti, process)
        return wait_until(find, timeout, f"{task_id} of {dag_id} run {run_id} to run", 0.2)


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
