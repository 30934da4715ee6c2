"""``scripts/airflow-ui.sh`` as a user runs it: the UI comes up, and stopping it leaves no Airflow process.

Each case starts the real script (real ``airflow standalone``: scheduler with
LocalExecutor workers, DAG processor, API server, triggerer) on free ports with
its files in a temporary directory, waits until every component runs, stops it
the way a user would, and checks that every process it started is gone (the shared harness
``airflow_processes.AirflowUIScript`` starts and stops it).
Slow: 30-55 s per case on 2 cores (Airflow's start-up 27-53 s depending on
load, the first also migrates the metadata DB; the stop 3-6 s), 70-100 s for the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.airflow_processes import AirflowUIScript, airflow_ui_env, cmdline

pytestmark = pytest.mark.slow

START_TIMEOUT = 180.0
STOP_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def ui_home(tmp_path_factory) -> Path:
    """One Airflow home for the module: its metadata DB is migrated by the first start only."""
    return tmp_path_factory.mktemp("airflow-ui")


@pytest.fixture
def ui_env(ui_home, tmp_path, s3_server, mysql_database) -> dict[str, str]:
    """The script's environment: the test session's S3 server and MariaDB, free ports, files in temp dirs."""
    # the stop is under test, not the sample data (seeding takes a minute)
    return airflow_ui_env(ui_home, tmp_path / "state", s3_server.port, mysql_database, {"INSPECTION_UI_SEED": "false"})


# scripts/stop-services.sh runs the same stop (lib.sh stop_airflow) from the pid file; as a third case it passed
# too, but each case costs a full start-up of Airflow.
@pytest.mark.parametrize("how", ["SIGTERM to the script", "Ctrl-C"])
def test_stopping_the_ui_stops_every_airflow_process(ui_env, tmp_path, how):
    ui = AirflowUIScript(ui_env, tmp_path / "airflow-ui.log", start_timeout=START_TIMEOUT, stop_timeout=STOP_TIMEOUT)
    try:
        ui.start()
        output = ui.log_path.read_text()
        assert f"http://localhost:{ui_env['AIRFLOW__API__PORT']}" in output
        assert "Sign-in: no sign-in" in output and "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True" in output

        left, stopped = ui.stop(ctrl_c=how == "Ctrl-C")
        assert not left, f"still running {stopped:.0f}s after {how}: " + "; ".join(
            f"{p.pid} {cmdline(p)[:80]}" for p in left)
        assert not ui.pid_file.exists()
        assert ui.script.returncode == (143 if how == "SIGTERM to the script" else 130)
        print(f"{how}: up in {ui.started_in:.0f}s ({len(ui.processes)} processes), all stopped in {stopped:.1f}s")
    finally:
        ui.force_clean_up()
