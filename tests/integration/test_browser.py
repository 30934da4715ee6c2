"""The Airflow UI in a real browser, as an operator uses it (issue #8, phase A).

One real ``scripts/airflow-ui.sh`` for the whole module (``airflow standalone``: API server,
scheduler with LocalExecutor, DAG processor, triggerer) on free ports, files in temporary
directories, the test session's S3 server and MariaDB, the script's own seeding of the demo
samples, and sign-in REQUIRED (``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False``, user
``admin`` with a password the test writes into SimpleAuthManager's password file). Headless
Chromium (Debian's, driven by Playwright) signs in on the login page, then for each DAG opens its
page, presses Trigger, submits the trigger form with its default values and sees the run start, in
the UI and through the REST API. At the end the script is stopped as a user stops it and no
Airflow process may be left.

Screenshots of every step go to ``<pytest basetemp>/browser-screenshots*/`` (kept after the run, the
path is printed) and to ``$INSPECTION_SCREENSHOT_DIR`` when set; a failing step adds
``FAILED-<step>.png`` / ``.html`` / ``.url`` and the script's output ``airflow-ui.log``.

Later phases add their tests before ``test_stopping_the_ui_leaves_no_airflow_process`` and reuse the
module fixtures ``airflow_ui`` (started, REST helpers: ``api``, ``token``, ``wait_for_run_state``)
and ``ui`` (signed-in page: ``page``, ``screenshot``, ``trigger_with_defaults``, ``step``) in the
same Airflow session.

Markers ``slow`` and ``browser`` (``-m "not browser"`` leaves it out). On the 2-core development machine
the module takes 1m45-2m when nothing else runs (seeding + migration + standalone's start-up 63-71 s, each
trigger 5-10 s, the stop 6-8 s) and 3m30 while other Airflow tests run beside it (start-up 130 s).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import S3_ACCESS_KEY, SESSION_DIR, _free_port
from tests.integration.airflow_browser import ADMIN_USER, AirflowUI, BrowserUI, _cmdline

pytestmark = [pytest.mark.slow, pytest.mark.browser]

DAG_IDS = ("clip_index_normal", "clip_index_defect", "patchcore_memory_bank", "deployment_rollback")
STARTED = {"running", "success"}
"""Run states that show the scheduler started the run (queued only means it was created)."""
# deployment_rollback's defaults roll clip:normal back to its previous version: with nothing (or one
# version) published yet its rollback task fails, which is still a run that started.
STARTED_BY_DAG = {"deployment_rollback": STARTED | {"failed"}}
UI_TIMEOUT_MS = 90_000
"""Playwright's timeout for each action and expectation: the 2 cores are busy with Airflow and torch tasks."""

_MODULE_STARTED = time.monotonic()


def _chromium() -> str:
    path = os.environ.get("INSPECTION_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip(f"no Chromium at {path} (scripts/test.sh installs Debian's chromium; or set INSPECTION_CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    """Screenshots and failure dumps; pytest keeps its basetemp of the last runs."""
    return tmp_path_factory.mktemp("browser-screenshots")


@pytest.fixture(scope="module")
def airflow_ui(s3_server, mysql_database, tmp_path_factory):
    """The real airflow-ui.sh with sign-in required, started and ready (all DAGs parsed); stopped at the end."""
    _chromium()  # skip before spending a minute on Airflow
    # Big files (the random CLIP checkpoint, image mirrors) go to the session dir, removed after the run.
    home = Path(SESSION_DIR) / "browser-ui"
    password = secrets.token_urlsafe(12)
    AirflowUI.write_password(home / "airflow", password)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSPECTION_", "AIRFLOW"))}
    env.update({
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "INSPECTION_DATA_ROOT": str(home / "data"),
        "INSPECTION_STATE_DIR": str(home / "state"),
        # the script seeds the demo samples itself (INSPECTION_UI_SEED unset), into this throw-away database
        "INSPECTION_DEMO_DATABASE": mysql_database["database"],
        # no scheduled CLIP run on unpausing (it would hold max_active_runs=1 and load the 2 cores): manual runs only
        "INSPECTION_CLIP_SCHEDULE": "none",
        "INSPECTION_S3_PORT": str(s3_server.port),
        "INSPECTION_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "INSPECTION_MYSQL_HOST": mysql_database["host"],
        "INSPECTION_MYSQL_PORT": str(mysql_database["port"]),
        "INSPECTION_MYSQL_USER": mysql_database["user"],
        "INSPECTION_MYSQL_PASSWORD": mysql_database["password"],
        "AIRFLOW__API__PORT": str(_free_port()),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
        "NO_COLOR": "1",
    })
    log_path = tmp_path_factory.mktemp("browser-airflow") / "airflow-ui.log"
    airflow = AirflowUI(env=env, password=password, log_path=log_path)
    try:
        airflow.start()
        airflow.wait_ready(DAG_IDS)
        print(f"airflow-ui.sh up in {airflow.started_in:.0f}s, ready with its DAGs after "
              f"{time.monotonic() - _MODULE_STARTED:.0f}s; log {log_path}")
        yield airflow
    except BaseException:
        print(f"airflow-ui.sh's output ends:\n{airflow.log_tail()}")
        raise
    finally:
        left, _ = airflow.stop()
        airflow.force_clean_up()
        assert not left, "Airflow processes left after the stop: " + "; ".join(str(p.pid) for p in left)


@pytest.fixture(scope="module")
def ui(airflow_ui, artefacts):
    """Headless Chromium signed in as the admin; ``BrowserUI`` over its page."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=UI_TIMEOUT_MS)
    copy_to = Path(os.environ["INSPECTION_SCREENSHOT_DIR"]) if os.environ.get("INSPECTION_SCREENSHOT_DIR") else None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=_chromium(), headless=True,
            args=["--disable-dev-shm-usage", *(["--no-sandbox"] if os.geteuid() == 0 else [])])
        context = browser.new_context(viewport={"width": 1440, "height": 900}, locale="en-US")
        context.set_default_timeout(UI_TIMEOUT_MS)
        context.set_default_navigation_timeout(UI_TIMEOUT_MS)
        browser_ui = BrowserUI(context.new_page(), airflow_ui, artefacts, copy_to)
        try:
            browser_ui.sign_in()
            yield browser_ui
        finally:
            print(f"screenshots: {artefacts}" + (f" (copied to {copy_to})" if copy_to else ""))
            context.close()
            browser.close()


@pytest.fixture(autouse=True)
def _dump_on_failure(request):
    """A failing test leaves the page's screenshot and HTML (steps dump their own as well)."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "ui" in request.fixturenames:
        request.getfixturevalue("ui").dump(request.node.name)


def test_sign_in_is_required(airflow_ui, ui):
    """The login page was shown and passed (fixture ``ui``); the REST API refuses calls without the token."""
    import requests

    output = airflow_ui.log_path.read_text()
    assert "Sign-in: user admin" in output, output[-2000:]
    assert requests.get(f"{airflow_ui.api_url}/api/v2/dags", timeout=30).status_code in (401, 403)
    wrong = requests.post(f"{airflow_ui.api_url}/auth/token", json={"username": ADMIN_USER, "password": "wrong"},
                          timeout=30)
    assert wrong.status_code == 401
    dags = {dag["dag_id"] for dag in airflow_ui.api("GET", "/api/v2/dags", params={"limit": 100})["dags"]}
    assert set(DAG_IDS) <= dags


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_trigger_with_defaults_starts_a_run(airflow_ui, ui, dag_id):
    """DAG page -> Trigger -> submit the form as it opens -> the run starts (UI and REST API)."""
    from playwright.sync_api import expect

    started = time.monotonic()
    run_id = ui.trigger_with_defaults(dag_id)

    run = airflow_ui.dag_run(dag_id, run_id)
    assert run["run_type"] == "manual", run
    assert run.get("triggering_user_name", ADMIN_USER) == ADMIN_USER, run
    # the form's "Unpause <dag> on trigger" box is ticked by default, so the run does not wait in a paused DAG
    assert airflow_ui.api("GET", f"/api/v2/dags/{dag_id}")["is_paused"] is False

    wanted = STARTED_BY_DAG.get(dag_id, STARTED)
    state = airflow_ui.wait_for_run_state(dag_id, run_id, wanted)
    seen = ui.see_run_state(dag_id, run_id, wanted)
    expect(ui.run_header(run_id).get_by_text(ADMIN_USER, exact=True)).to_be_visible()  # Triggering User
    print(f"{dag_id}: run {run_id} {state} (REST), {seen!r} in the UI, {time.monotonic() - started:.0f}s")


def test_stopping_the_ui_leaves_no_airflow_process(airflow_ui):
    """Last: the script's stop (SIGTERM, as ``kill`` or stop-services.sh) ends every process, runs included."""
    for dag_id in DAG_IDS:  # where the runs got to (they are stopped with Airflow)
        runs = airflow_ui.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 10})["dag_runs"]
        print(f"{dag_id}: " + ", ".join(f"{run['dag_run_id']} {run['state']}" for run in runs))
    left, seconds = airflow_ui.stop()
    assert not left, f"still running {seconds:.0f}s after SIGTERM: " + "; ".join(
        f"{p.pid} {_cmdline(p)[:80]}" for p in left)
    assert airflow_ui.script.returncode == 143
    assert not airflow_ui.pid_file.exists()
    print(f"stopped in {seconds:.1f}s; module so far {time.monotonic() - _MODULE_STARTED:.0f}s")
