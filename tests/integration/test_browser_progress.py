"""Runs in progress on the Deployments page, in a real browser against a real Airflow (issue #15 item 10).

The same harness and module fixtures as ``test_browser.py`` (``scripts/airflow-ui.sh``: API server,
scheduler, DAG processor, triggerer; sign-in required; headless Chromium signed in as the admin). A
real ``clip_index_normal`` run with ``require_approval`` embeds the demo's normal images (random-init
weights) and then waits for approval; nothing is stood in for:

1. while ``embed`` works, Browse -> Deployments shows the run (linked to its Airflow run page) at the
   ``embed`` stage with the figures its progress line logged (``N/M images``), written into the run's
   ``deployment_logs`` row by the real reporter;
2. without reloading the page (the section's script refetches it every few seconds) the same run then
   shows "waiting for approval", linked to the ``approve`` task's Required Actions page, and that page
   of the Airflow UI offers Approve.

Markers ``slow`` and ``browser``; about 5 minutes on the 2-core machine (start-up 1-1.5 min, the run's
download and embed of the demo's normal images 1.5-3 min).
"""

from __future__ import annotations

import re
import time
from urllib.parse import quote

import pytest
import requests

from tests.integration.airflow_browser import AirflowUI, BrowserUI
from tests.integration.airflow_processes import wait_until
from tests.integration.test_browser import (  # noqa: F401 (the module fixtures, shared)
    _dump_on_failure, airflow_ui, artefacts, ui, ui_database,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

DAG_ID = "clip_index_normal"
RUN_TIMEOUT = 420.0
CONSOLE_TIMEOUT = 120.0


def _task_state(airflow: AirflowUI, run_id: str, task_id: str) -> str | None:
    return airflow.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}")["state"]


def _console_runs(airflow: AirflowUI) -> dict:
    """The console's ``/runs.json`` as the admin (the same data the page's section shows). It asks Airflow's
    REST API twice and MariaDB once: a longer timeout than the harness's for one REST call, for busy cores."""
    started = time.monotonic()
    response = requests.get(f"{airflow.api_url}/deployments/runs.json", timeout=CONSOLE_TIMEOUT,
                            headers={"Authorization": f"Bearer {airflow.token()}"})
    assert response.ok, f"/deployments/runs.json: {response.status_code} {response.text[:500]}"
    print(f"runs.json in {time.monotonic() - started:.1f}s: {response.text[:300]}")
    return response.json()


def _stage(airflow: AirflowUI, run_id: str, key: str) -> dict | None:
    for run in _console_runs(airflow)["runs"]:
        if run["run_id"] == run_id:
            return next((stage for stage in run["stages"] if stage["key"] == key), None)
    return None


def test_a_run_in_progress_shows_its_stage_figures_and_then_its_waiting_approval(airflow_ui: AirflowUI,
                                                                                  ui: BrowserUI):
    from playwright.sync_api import expect

    airflow_ui.set_paused(DAG_ID, False)
    # full_rebuild: test_browser.py's runs (same state dir) cached these embeddings, and a cached embed has no figures
    run_id = airflow_ui.trigger(DAG_ID, {"require_approval": True, "full_rebuild": True},
                                note="progress on the Deployments page")
    run_link = f"/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"
    try:
        def embedding_with_figures() -> dict | None:
            # The run is in progress until someone answers its approval; embed itself may take only a few
            # seconds on an idle machine, so its figures are taken running or just finished.
            assert airflow_ui.dag_run(DAG_ID, run_id)["state"] in ("queued", "running"), "the run ended"
            stage = _stage(airflow_ui, run_id, "embed")
            figures = (stage or {}).get("figures") or {}
            if stage and figures:
                return stage
            return None

        with ui.step("embed-in-progress"):
            stage = wait_until(embedding_with_figures, RUN_TIMEOUT, f"{DAG_ID} run {run_id} embedding, with figures",
                               interval=1.0)
            total = stage["figures"]["total"]
            console = ui.open_deployments()
            section = console.locator("#runs-in-progress")
            run = section.locator(f'article.run[data-run-id="{run_id}"]')
            expect(run.get_by_role("link", name=f"run {run_id}")).to_have_attribute("href", re.compile(re.escape(run_link) + "$"))
            embed = run.locator('tr[data-stage="embed"]')
            expect(embed).to_contain_text(re.compile(rf"Embedding normal images: \d+/{total} images \(\d+%\)"))
            ui.screenshot("runs-in-progress-embed")

        with ui.step("waiting-for-approval"):
            wait_until(lambda: _task_state(airflow_ui, run_id, "approve") == "awaiting_input", RUN_TIMEOUT,
                       f"{DAG_ID} run {run_id} waiting for approval", interval=2.0)
            # The same page, not reloaded: the section's script brought the new stage.
            approval = run.get_by_role("link", name="waiting for approval")
            expect(approval).to_have_attribute("href", re.compile(re.escape(f"{run_link}/tasks/approve/required_actions") + "$"))
            # The finished embed stage keeps its closing figures beside it.
            expect(run.locator('tr[data-stage="embed"]')).to_contain_text(f"{total}/{total} images (100%)")
            ui.screenshot("runs-in-progress-waiting-for-approval")
            href = approval.get_attribute("href")

        with ui.step("required-actions-page"):
            ui.page.goto(f"{airflow_ui.base_url}{href}")
            expect(ui.page.get_by_role("button", name="Approve").first).to_be_visible()
            ui.screenshot("required-actions-of-approve")
    finally:  # the next module's Airflow uses the same metadata DB: leave no run waiting (max_active_runs=1)
        airflow_ui.api("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}", json={"state": "failed"})
