"""``scripts/airflow-ui.sh`` as a user runs it: the UI comes up, and stopping it leaves no Airflow process.

Each case starts the real script (real ``airflow standalone``: scheduler with
LocalExecutor workers, DAG processor, API server, triggerer) on free ports with
its files in a temporary directory, waits until every component runs, stops it
the way a user would, and checks that every process it started is gone.
Slow: 30-55 s per case on 2 cores (Airflow's start-up 27-53 s depending on
load, the first also migrates the metadata DB; the stop 3-6 s), 70-100 s for the module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, S3_ACCESS_KEY, _free_port
from tests.integration.airflow_browser import _alive, _cmdline, _port_answers, _session


pytestmark = pytest.mark.slow

COMPONENTS = ("airflow scheduler", "airflow dag-processor", "api_server", "airflow triggerer", "LocalExecutor")
"""Command-line fragments of the processes that must be running before the stop is worth testing."""
START_TIMEOUT = 180.0
STOP_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def ui_home(tmp_path_factory) -> Path:
    """One Airflow home for the module: its metadata DB is migrated by the first start only."""
    return tmp_path_factory.mktemp("airflow-ui")


@pytest.fixture
def ui_env(ui_home, tmp_path, s3_server, mysql_database) -> dict[str, str]:
    """The script's environment: the test session's S3 server and MariaDB, free ports, files in temp dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSPECTION_", "AIRFLOW"))}
    env.update({
        "AIRFLOW_HOME": str(ui_home / "airflow"),
        "INSPECTION_DATA_ROOT": str(ui_home / "data"),
        "INSPECTION_STATE_DIR": str(tmp_path / "state"),
        "INSPECTION_UI_SEED": "false",  # the stop is under test, not the sample data (seeding takes a minute)
        "INSPECTION_S3_PORT": str(s3_server.port),
        "INSPECTION_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "INSPECTION_MYSQL_HOST": mysql_database["host"],
        "INSPECTION_MYSQL_PORT": str(mysql_database["port"]),
        "INSPECTION_MYSQL_USER": mysql_database["user"],
        "INSPECTION_MYSQL_PASSWORD": mysql_database["password"],
        "AIRFLOW__API__PORT": str(_free_port()),
        # the log servers of scheduler and triggerer must not clash with a UI the developer is running
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
        "NO_COLOR": "1",
    })
    return env


def _start_ui(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, int, list[psutil.Process]]:
    """Start the script in a session of its own; return it, standalone's pid and every process once all run."""
    with open(log_path, "wb") as log:
        script = subprocess.Popen(
            ["bash", str(REPO / "scripts/airflow-ui.sh")], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
            # a Ctrl-C must reach the script even where the test runner was started with SIGINT ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    pid_file = Path(env["INSPECTION_STATE_DIR"]) / "airflow.pid"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert script.poll() is None, f"airflow-ui.sh exited with {script.returncode}:\n{log_path.read_text()[-3000:]}"
        if pid_file.exists() and _port_answers(int(env["AIRFLOW__API__PORT"])):
            leader = int(pid_file.read_text().split()[0])
            processes = [psutil.Process(script.pid), *psutil.Process(script.pid).children(recursive=True)]
            running = " | ".join(_cmdline(p) for p in processes)
            if all(component in running for component in COMPONENTS):
                return script, leader, processes
        time.sleep(1)
    _clean_up(script, env)
    pytest.fail(f"Airflow UI not up after {START_TIMEOUT}s:\n{log_path.read_text()[-3000:]}")


def _clean_up(script: subprocess.Popen, env: dict[str, str]) -> None:
    """After a failure: leave no Airflow running (the script's own stop first, then the pid file's)."""
    if script.poll() is None:
        script.terminate()
        try:
            script.wait(30)
        except subprocess.TimeoutExpired:
            script.kill()
    pid_file = Path(env["INSPECTION_STATE_DIR"]) / "airflow.pid"
    subprocess.run([sys.executable, "-m", "inspection_refresh.dev.process_tree", "stop", "--pid-file", str(pid_file),
                    "--grace", "5"], check=False, timeout=60)


def _stop_and_check(ui_env: dict[str, str], log_path: Path, how: str, script: subprocess.Popen, leader: int,
                    processes: list[psutil.Process], up: float) -> None:
    output = log_path.read_text()
    assert f"http://localhost:{ui_env['AIRFLOW__API__PORT']}" in output
    assert "Sign-in: no sign-in" in output and "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True" in output
    processes += [p for p in _session(leader) if p.pid not in {q.pid for q in processes}]

    stopping = time.monotonic()
    if how == "SIGTERM to the script":
        script.send_signal(signal.SIGTERM)
    else:  # Ctrl-C: the terminal signals the foreground process group, i.e. the script, not standalone
        os.killpg(script.pid, signal.SIGINT)
    script.wait(STOP_TIMEOUT)
    deadline = stopping + STOP_TIMEOUT
    while (left := [p for p in processes if _alive(p)] + _session(leader)) and time.monotonic() < deadline:
        time.sleep(0.2)
    stopped = time.monotonic() - stopping

    assert not left, f"still running {stopped:.0f}s after {how}: " + "; ".join(
        f"{p.pid} {_cmdline(p)[:80]}" for p in left)
    assert not (Path(ui_env["INSPECTION_STATE_DIR"]) / "airflow.pid").exists()
    assert script.returncode == (143 if how == "SIGTERM to the script" else 130)
    print(f"{how}: up in {up:.0f}s ({len(processes)} processes), all stopped in {stopped:.1f}s")


# scripts/stop-services.sh runs the same stop (lib.sh stop_airflow) from the pid file; as a third case it passed
# too, but each case costs a full start-up of Airflow.
@pytest.mark.parametrize("how", ["SIGTERM to the script", "Ctrl-C"])
def test_stopping_the_ui_stops_every_airflow_process(ui_env, tmp_path, how):
    started = time.monotonic()
    log_path = tmp_path / "airflow-ui.log"
    script, leader, processes = _start_ui(ui_env, log_path)
    try:
        _stop_and_check(ui_env, log_path, how, script, leader, processes, time.monotonic() - started)
    finally:
        _clean_up(script, ui_env)
