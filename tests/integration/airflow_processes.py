"""Real Airflow processes for the tests: starting them, waiting until they serve, stopping all they started.

Two ways the tests run Airflow, and the environment each runs in:

* :class:`AirflowUIScript`: ``scripts/airflow-ui.sh`` as a user runs it (``airflow standalone``: API server,
  scheduler with LocalExecutor workers, DAG processor, triggerer, all in one session of their own, recorded in
  ``$INSPECTION_STATE_DIR/airflow.pid``), in the environment of :func:`airflow_ui_env`, and stopped as a user
  stops it: SIGTERM to the script or Ctrl-C. ``test_ui_script.py`` tests that stop;
  ``airflow_browser.AirflowUI`` adds sign-in and the REST API for the browser tests.
* :class:`AirflowProcesses`: ``airflow api-server``, ``airflow scheduler`` and ``airflow dag-processor`` of one
  AIRFLOW_HOME as separate processes, as production runs them, driven through the REST API as the UI does:
  LocalExecutor on SQLite (``test_real_scheduler.py``), or CeleryExecutor with workers
  (``celery_cluster.CeleryCluster``).

Both leave nothing running: every process is the leader of its own session, and a stop ends the session with
all its descendants (``inspection_refresh.dev.process_tree``), since task processes leave their parents'
process groups.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from inspection_refresh.dev.process_tree import stop_session

from tests.conftest import REPO, S3_ACCESS_KEY, _free_port

T = TypeVar("T")

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
RUN_TIMEOUT_S = 240
"""How long a DAG run of the tests may take on the 2-core development machine."""
UI_SCRIPT = REPO / "scripts" / "airflow-ui.sh"
UI_COMPONENTS = ("airflow scheduler", "airflow dag-processor", "api_server", "airflow triggerer", "LocalExecutor")
"""Command-line fragments of the processes ``airflow standalone`` runs once it is fully up."""


# ------------------------------------------------------------------------------------------ processes
def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail after ``timeout`` s.

    It is asked once more after the deadline, so a poll slower than ``interval`` still gets its last chance.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_answers(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (an ended child its parent has not reaped yet counts as gone)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def has_ended(process: psutil.Process) -> bool:
    """Gone, or a zombie: a task process whose supervisor has not reaped it yet has ended too."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def cmdline(process: psutil.Process) -> str:
    """The command line, or "" for a process that is gone (for messages and matching, never raising)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def session_processes(leader: int) -> list[psutil.Process]:
    """The live processes of ``leader``'s session: what a stop must end, wherever it was forked."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == leader and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):
            pass
    return found


def task_process(ti_id: str) -> psutil.Process | None:
    """The Task SDK's task child (not its supervisor, titled ``... LocalExecutor: <id>``), or None.

    That child runs the task and titles itself ``airflow worker -- <task instance id>``: it is what a crash or
    the OOM killer takes, and what the tests ``kill -9``.
    """
    title = f"airflow worker -- {ti_id}"
    for process in psutil.process_iter(["cmdline"]):
        if " ".join(process.info["cmdline"] or ()).strip() == title:
            return process
    return None


# ------------------------------------------------------------------------------ scripts/airflow-ui.sh
def airflow_ui_env(home: Path, state_dir: Path, s3_port: int, mysql: dict[str, Any],
                   settings: dict[str, str] | None = None) -> dict[str, str]:
    """``scripts/airflow-ui.sh``'s environment in a test: the test session's S3 server and MariaDB (``mysql``:
    the ``mysql_database`` fixture), Airflow's home and the data under ``home``, free ports; ``settings`` on top.

    None of the session's own ``AIRFLOW*`` and ``INSPECTION_*`` settings: the script makes its own, as for a user.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSPECTION_", "AIRFLOW"))}
    env.update({
        "AIRFLOW_HOME": str(home / "airflow"),
        "INSPECTION_DATA_ROOT": str(home / "data"),
        "INSPECTION_STATE_DIR": str(state_dir),
        "INSPECTION_S3_PORT": str(s3_port),
        "INSPECTION_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "INSPECTION_MYSQL_HOST": mysql["host"],
        "INSPECTION_MYSQL_PORT": str(mysql["port"]),
        "INSPECTION_MYSQL_USER": mysql["user"],
        "INSPECTION_MYSQL_PASSWORD": mysql["password"],
        "AIRFLOW__API__PORT": str(_free_port()),
        # the log servers of scheduler and triggerer must not clash with a UI the developer is running
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
        "NO_COLOR": "1",
        **(settings or {}),
    })
    return env


@dataclass
class AirflowUIScript:
    """``scripts/airflow-ui.sh`` started with ``env`` (:func:`airflow_ui_env`), its output in ``log_path``."""

    env: dict[str, str]
    log_path: Path
    start_timeout: float = 180.0
    """Airflow's start-up (27-53 s on 2 cores) and the first start's migration of the metadata DB."""
    stop_timeout: float = 20.0
    """How long the script's stop may take until every process it started is gone (3-6 s measured)."""
    script: subprocess.Popen | None = None
    leader: int = 0
    """``airflow standalone``'s pid (the script's pid file): the leader of the session all of Airflow runs in."""
    processes: list[psutil.Process] = field(default_factory=list)
    """The script and all it had started once standalone's components ran."""
    started_in: float = 0.0

    @property
    def port(self) -> int:
        return int(self.env["AIRFLOW__API__PORT"])

    @property
    def base_url(self) -> str:
        """What a person opens (the script's AIRFLOW__API__BASE_URL)."""
        return f"http://localhost:{self.port}"

    @property
    def pid_file(self) -> Path:
        return Path(self.env["INSPECTION_STATE_DIR"]) / "airflow.pid"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def tree(self) -> list[psutil.Process]:
        """The script and its descendants now."""
        if self.script is None:
            return []
        try:
            root = psutil.Process(self.script.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def start(self) -> None:
        """Start the script in a session of its own; return once standalone's components run and the API answers."""
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.script = subprocess.Popen(
                ["bash", str(UI_SCRIPT)], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
                # a Ctrl-C must reach the script even where the test runner was started with SIGINT ignored
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        try:
            self.processes = wait_until(self._components_up, self.start_timeout, "Airflow standalone's components")
        except AssertionError as error:
            raise AssertionError(f"{error}; airflow-ui.sh's output ends:\n{self.log_tail()}") from None
        self.started_in = time.monotonic() - started

    def _components_up(self) -> list[psutil.Process]:
        """The script's process tree once the API answers and every one of UI_COMPONENTS runs; else []."""
        assert self.script is not None and self.script.poll() is None, (
            f"airflow-ui.sh exited with {self.script and self.script.returncode}")
        if not (self.pid_file.exists() and port_answers(self.port)):
            return []
        self.leader = int(self.pid_file.read_text().split()[0])
        tree = self.tree()
        running = " | ".join(cmdline(p) for p in tree)
        return tree if all(component in running for component in UI_COMPONENTS) else []

    def stop(self, *, ctrl_c: bool = False) -> tuple[list[psutil.Process], float]:
        """Stop the script as a user does; return what is still alive ``stop_timeout`` s later, and the time taken.

        SIGTERM to the script (``kill``, stop-services.sh), or with ``ctrl_c`` SIGINT to its process group: the
        terminal signals the foreground process group, i.e. the script, not standalone (a session of its own).
        Alive counts the script, all it had started and every process of standalone's session.
        """
        if self.script is None:
            return [], 0.0
        leader_session = session_processes(self.leader) if self.leader else []
        seen = {p.pid: p for p in [*self.processes, *self.tree(), *leader_session]}
        stopping = time.monotonic()
        if self.script.poll() is None:
            if ctrl_c:
                os.killpg(self.script.pid, signal.SIGINT)
            else:
                self.script.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.script.wait(self.stop_timeout)
        deadline = stopping + self.stop_timeout
        while True:
            left = {p.pid: p for p in seen.values() if alive(p)}
            if self.leader:
                left.update({p.pid: p for p in session_processes(self.leader)})
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return list(left.values()), time.monotonic() - stopping

    def force_clean_up(self) -> None:
        """After a failure: leave no Airflow running (the script's own stop first, then the pid file's session)."""
        if self.script is not None and self.script.poll() is None:
            self.script.terminate()
            try:
                self.script.wait(30)
            except subprocess.TimeoutExpired:
                self.script.kill()
                self.script.wait(10)
        subprocess.run([sys.executable, "-m", "inspection_refresh.dev.process_tree", "stop", "--pid-file",
                        str(self.pid_file), "--grace", "5"], check=False, timeout=60)


# ------------------------------------------------------------------------- api-server, scheduler, dag-processor
@dataclass
class AirflowProcesses:
    """API server, scheduler and DAG processor of one AIRFLOW_HOME as separate processes, driven through the REST API.

    LocalExecutor on a SQLite metadata DB in ``home`` (:meth:`executor_env`; ``celery_cluster.CeleryCluster``
    overrides it); ``extra_env`` goes on top of :attr:`env`. Each component logs to ``home/<name>.log``.
    """

    home: Path
    _: KW_ONLY
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=_free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)
    """Each component's start (unix time): its stop never signals an older process that reuses a pid."""
    killed: set[str] = field(default_factory=set)
    """Components a test killed on purpose: :meth:`check_alive` does not count them as dead."""
    token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What every component shares: the test session's environment (``AIRFLOW_CONN_*``, ``INSPECTION_*``, the
        plugins folder, from conftest), this home, the API server as the tasks' execution API, no sign-in, the
        secrets all components must agree on; then :meth:`executor_env` and ``extra_env``."""
        return {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt"),
            "AIRFLOW__API__SECRET_KEY": self._secret("api"),
            **self.executor_env(),
            **self.extra_env,
        }

    def executor_env(self) -> dict[str, str]:
        """The executor and the metadata DB: LocalExecutor, SQLite in the home."""
        return {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}"}

    def _secret(self, name: str) -> str:
        """The same random secret for every component and every call (kept in the home)."""
        path = self.home / f".{name}-secret"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
        return path.read_text()

    # -- life cycle -------------------------------------------------------------------
    def start(self, *, before: Iterable[Sequence[str]] = (), api_timeout: float = 180) -> None:
        """Migrate the metadata DB, run the CLI commands ``before`` (``pools set ...``), start the components and
        wait until the API server answers; take the admin's token."""
        self.cli("db", "migrate")
        for args in before:
            self.cli(*args)
        self.start_components()
        log = self.home / "api-server.log"
        wait_until(self._api_answers, api_timeout, f"the API server on {self.url} ({log})", 1)
        self.token = self.api("GET", "/auth/token")["access_token"]

    def start_components(self) -> None:
        self.spawn("api-server", ["api-server", "--port", str(self.port), "--workers", "1"])
        self.spawn("scheduler", ["scheduler"])
        self.spawn("dag-processor", ["dag-processor"])

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        """``airflow <args>`` as component ``name``, its output appended to ``home/<name>.log``."""
        with open(self.home / f"{name}.log", "ab") as out:
            # Own session: stop() signals each component with everything it started.
            self.started_at[name] = time.time()
            self.processes[name] = subprocess.Popen([AIRFLOW, *args], env=env or self.env, stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> bool:
        """Raise if a component (other than one a test killed) has exited; else True."""
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

    # -- CLI and REST API ----------------------------------------------------------------
    def cli(self, *args: str) -> None:
        """``airflow <args>`` in the components' environment; it must succeed."""
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
        """A manual run (no logical date), as the UI's Trigger makes; its run id."""
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

    def running_task(self, dag_id: str, run_id: str, task_id: str, timeout: float = RUN_TIMEOUT_S,
                     interval: float = 0.2) -> tuple[dict[str, Any], psutil.Process]:
        """(task instance, the task's process: :func:`task_process`) as soon as ``task_id`` runs."""
        def find() -> tuple[dict[str, Any], psutil.Process] | None:
            ti = self.task_instances(dag_id, run_id).get(task_id, {})
            process = task_process(ti["id"]) if ti.get("state") == "running" else None
            return (ti, process) if process else None
        return wait_until(find, timeout, f"{task_id} of {dag_id} run {run_id} to run", interval)
