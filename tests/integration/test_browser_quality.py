"""The quality gate in a real browser: a flagged run's approval request and the live version's console card
list what was flagged.

The same harness as ``test_browser.py`` (its module fixtures, so an Airflow of this module's own: the real
``scripts/airflow-ui.sh`` with sign-in required, the session's S3 server and MariaDB, headless Chromium). A small
gallery of its own (product 91, under a prefix the demo does not use) holds a byte-identical duplicate and a
re-encoded near-duplicate (not listed: with random weights the embedding checks are skipped); ``clip_index_normal`` runs with ``quality_gate=approve`` and ``require_approval`` off,
so only the gate makes it ask. In the browser: the approve task's Required actions page shows the gate's section
naming the duplicate, Approve is pressed there, and once the run has published, Browse -> Deployments shows the
CLIP normal card's "Flagged by the quality checks" list.

Markers ``slow`` and ``browser``; about the time of ``test_browser.py``'s start-up plus one small CLIP run.
"""

from __future__ import annotations

import pytest
from inspection_refresh import compose

from tests.integration.test_browser import (  # noqa: F401 (fixtures)
    DEMO_BUCKET, _dump_on_failure, airflow_ui, artefacts, ui, ui_database,
)
from tests.integration.test_quality_gates import reencoded
from tests.samples import sample_jpeg

pytestmark = [pytest.mark.slow, pytest.mark.browser]

DAG_ID = "clip_index_normal"
PREFIX = "images/normal/91/"
DUPLICATE = f"{PREFIX}GATE91_OK_100.jpg"
NEAR_DUPLICATE = f"{PREFIX}GATE91_OK_101.jpg"


def upload_flagged_gallery() -> None:
    client = compose.object_storage(bucket=DEMO_BUCKET).client  # the session's S3 server
    size = (320, 240)
    for seq in range(5):
        client.put_object(Bucket=DEMO_BUCKET, Key=f"{PREFIX}GATE91_OK_{seq:03d}.jpg",
                          Body=sample_jpeg(2, seq, size=size))
    client.put_object(Bucket=DEMO_BUCKET, Key=DUPLICATE, Body=sample_jpeg(2, 0, size=size))
    client.put_object(Bucket=DEMO_BUCKET, Key=NEAR_DUPLICATE, Body=reencoded(sample_jpeg(2, 1, size=size)))


def test_the_approval_request_and_the_console_card_list_what_was_flagged(airflow_ui, ui):  # noqa: F811
    from playwright.sync_api import expect

    from tests.integration.airflow_processes import wait_until

    upload_flagged_gallery()
    airflow_ui.set_paused(DAG_ID, False)  # a fresh installation's DAGs start paused
    run_id = airflow_ui.trigger(DAG_ID, {"prefix": PREFIX, "quality_gate": "approve", "require_approval": False})
    approve = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve"
    wait_until(lambda: airflow_ui.api("GET", approve).get("state") == "awaiting_input", 600,
               "the quality gate's approval request")

    page = ui.page
    with ui.step("quality-gate-required-actions"):
        page.goto(f"{airflow_ui.base_url}/dags/{DAG_ID}/runs/{run_id}/tasks/approve/required_actions?map_index=-1")
        expect(page.get_by_text("Quality gate — ").first).to_be_visible()
        expect(page.get_by_text("approval required (approve)").first).to_be_visible()
        expect(page.get_by_text(DUPLICATE).first).to_be_visible()
        ui.screenshot("quality-gate-required-actions")
        page.get_by_role("button", name="Approve").click()

    assert airflow_ui.wait_for_run_state(DAG_ID, run_id, {"success"}, timeout=600) == "success"

    with ui.step("quality-gate-console-card"):
        ui.open_deployments()
        card = ui.console.locator('article.card[data-artefact="clip:normal"]')
        flagged = card.locator("section.flagged")
        expect(flagged).to_contain_text("Flagged by the quality checks")
        expect(flagged.locator('li[data-check="exact_duplicates"]')).to_contain_text(DUPLICATE)
        # Random demo weights: the embedding checks are skipped (INSPECTION_QUALITY_SIMILARITY_CHECKS=auto), so the
        # re-encode is not listed as a near-duplicate here (test_quality_gates.py forces them on).
        expect(flagged.locator('li[data-check="near_duplicates"]')).to_have_count(0)
        ui.screenshot("quality-gate-console-card")
