"""The Airflow UI in a real browser, as an operator uses it (issue #8, phases A and B).

One real ``scripts/airflow-ui.sh`` for the whole module (``airflow standalone``: API server,
scheduler with LocalExecutor, DAG processor, triggerer) on free ports, files in temporary
directories, the test session's S3 server and MariaDB, the script's own seeding of the demo
samples, and sign-in REQUIRED (``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False``, user
``admin`` with a password the test writes into SimpleAuthManager's password file).

Phase A: headless Chromium (Debian's, driven by Playwright) signs in on the login page, then for each
DAG opens its page, presses Trigger, submits the trigger form with its default values and sees the run
start, in the UI and through the REST API.

Phase B, the Deployments console (``plugins/deployments_console.py``) in the same Airflow: phase A's
clip_index_normal run succeeds (version 1); one new image is uploaded to the demo bucket and a second run
(REST API) publishes version 2; then in the browser: Browse -> Deployments (the console in the UI's
frame), the CLIP normal card (live version, its run, image count, the random-weights badge, kept
versions), History (both ``clip_rebuild`` rows, one expanded to its message), Roll back on version 1
(the console's result names the deployment_rollback run; REST: conf, triggering user, note, audit log),
reloading the page afterwards (nothing triggered twice), and once the run succeeded: version 1 live and
pinned ("rolled back by" that run), and a ``rollback`` row in History; then, with deployment_rollback paused
(it is created unpaused), Roll forward triggers nothing and says so, and "Unpause and roll forward" makes
version 2 live again. Phase A's PatchCore run goes on meanwhile, unwaited for.

At the end the script is stopped as a user stops it and no Airflow process may be left.

Screenshots of every step go to ``<pytest basetemp>/browser-screenshots*/`` (kept after the run, the
path is printed) and to ``$INSPECTION_SCREENSHOT_DIR`` when set; a failing step adds
``FAILED-<step>.png`` / ``.html`` / ``.url`` and the script's output ``airflow-ui.log``.
``INSPECTION_DOCS_SCREENSHOTS=1`` also rewrites README.md's pictures ``docs/deployments-live.png`` and
``docs/deployments-history.png``; it first waits for phase A's clip_index_defect and PatchCore runs to
end, so every card is filled (about 6 minutes more).

Later phases add their tests before ``test_stopping_the_ui_leaves_no_airflow_process`` and reuse the
module fixtures ``airflow_ui`` (started, REST helpers: ``api``, ``token``, ``trigger``,
``wait_for_run_state``) and ``ui`` (signed-in page: ``page``, ``screenshot``, ``trigger_with_defaults``,
``open_deployments``, ``console``, ``step``) in the same Airflow session.

Markers ``slow`` and ``browser`` (``-m "not browser"`` leaves it out). On the 2-core development machine
the module takes 3m50-5m when nothing else runs: seeding + migration + standalone's start-up 55-90 s,
phase A 35-50 s (each trigger 5-12 s), phase B 2-2m40 (mostly waiting for the demo CLIP run, 360 images
embedded beside the PatchCore build, 80-120 s; the second run embeds one image, ~35 s), the stop 4-12 s.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from inspection_refresh import compose

from tests.conftest import SESSION_DIR
from tests.integration.airflow_browser import ADMIN_USER, AirflowUI, BrowserUI
from tests.integration.airflow_processes import airflow_ui_env, cmdline, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]

DAG_IDS = ("clip_index_normal", "clip_index_defect", "patchcore_memory_bank", "deployment_rollback")
STARTED = {"running", "success"}
"""Run states that show the scheduler started the run (queued only means it was created)."""
# deployment_rollback's defaults roll clip:normal back to its previous version: with nothing (or one
# version) published yet its rollback task fails, which is still a run that started.
STARTED_BY_DAG = {"deployment_rollback": STARTED | {"failed"}}
UI_TIMEOUT_MS = 90_000
"""Playwright's timeout for each action and expectation: the 2 cores are busy with Airflow and torch tasks."""
DEMO_RUNS: dict[str, str] = {}
"""Run ids of the runs phase A triggered through the form, by DAG."""

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
def ui_database(mysql_database):
    """A database of this module's own: the demo seed writes its products there, not into the tables
    other tests of the session fill with their own products."""
    import MySQLdb

    name = f"{mysql_database['database']}_ui"
    settings = {k: mysql_database[k] for k in ("host", "port", "user", "password")}
    conn = MySQLdb.connect(**settings)
    conn.cursor().execute(f"CREATE DATABASE `{name}`")
    yield name
    conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


@pytest.fixture(scope="module")
def airflow_ui(s3_server, mysql_database, ui_database, tmp_path_factory):
    """The real airflow-ui.sh with sign-in required, started and ready (all DAGs parsed); stopped at the end."""
    _chromium()  # skip before spending a minute on Airflow
    # Big files (the random CLIP checkpoint, image mirrors) go to the session dir, removed after the run.
    home = Path(SESSION_DIR) / "browser-ui"
    password = secrets.token_urlsafe(12)
    AirflowUI.write_password(home / "airflow", password)
    env = airflow_ui_env(home, home / "state", s3_server.port, mysql_database, {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        # the script seeds the demo samples itself (INSPECTION_UI_SEED unset), into this throw-away database
        "INSPECTION_DEMO_DATABASE": ui_database,
        # no scheduled CLIP run on unpausing (it would hold max_active_runs=1 and load the 2 cores): manual runs only
        "INSPECTION_CLIP_SCHEDULE": "none",
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
    assert re.search(r"Sign-in: user(\(s\))? admin\b", output), output[-2000:]
    assert requests.get(f"{airflow_ui.api_url}/api/v2/dags", timeout=30).status_code in (401, 403)
    wrong = requests.post(f"{airflow_ui.api_url}/auth/token", json={"username": ADMIN_USER, "password": "wrong"},
                          timeout=30)
    assert wrong.status_code == 401
    dags = {dag["dag_id"] for dag in airflow_ui.api("GET", "/api/v2/dags", params={"limit": 100})["dags"]}
    assert set(DAG_IDS) <= dags
    # A fresh installation: every DAG starts paused but deployment_rollback (no schedule), so the Deployments
    # page's Roll back runs without anyone touching a toggle.
    paused = {dag_id: airflow_ui.api("GET", f"/api/v2/dags/{dag_id}")["is_paused"] for dag_id in DAG_IDS}
    assert paused == {**dict.fromkeys(DAG_IDS, True), "deployment_rollback": False}, paused


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_trigger_with_defaults_starts_a_run(airflow_ui, ui, dag_id):
    """DAG page -> Trigger -> submit the form as it opens -> the run starts (UI and REST API)."""
    from playwright.sync_api import expect

    started = time.monotonic()
    run_id = ui.trigger_with_defaults(dag_id)

    DEMO_RUNS[dag_id] = run_id
    run = airflow_ui.dag_run(dag_id, run_id)
    assert run["run_type"] == "manual", run
    assert run.get("triggering_user_name", ADMIN_USER) == ADMIN_USER, run
    # The form's "Unpause <dag> on trigger" box is ticked by default, so the run does not wait in a paused DAG.
    # The UI sends that PATCH beside the trigger POST, not before it: it may land just after the run page opens.
    wait_until(lambda: airflow_ui.api("GET", f"/api/v2/dags/{dag_id}")["is_paused"] is False, 30,
               f"{dag_id} unpaused by the trigger form")

    wanted = STARTED_BY_DAG.get(dag_id, STARTED)
    state = airflow_ui.wait_for_run_state(dag_id, run_id, wanted)
    seen = ui.see_run_state(dag_id, run_id, wanted)
    expect(ui.run_header(run_id).get_by_text(ADMIN_USER, exact=True)).to_be_visible()  # Triggering User
    print(f"{dag_id}: run {run_id} {state} (REST), {seen!r} in the UI, {time.monotonic() - started:.0f}s")


# ------------------------------------------------------------------------ phase B: the Deployments console
CLIP_DAG = "clip_index_normal"
CLIP_LABEL = "clip:normal"
ROLLBACK_DAG = "deployment_rollback"
PATCHCORE_DAG = "patchcore_memory_bank"
RUN_TIMEOUT = 600.0
"""The demo CLIP run (360 images embedded on CPU), while phase A's PatchCore run holds a core: 2-4 min."""
CONSOLE: dict[str, str] = {}
"""What phase B's tests hand on: the two CLIP runs, their versions (old, new) and the rollback run."""
COUNTS: dict[str, int] = {}
"""Images in each CLIP normal version."""
DEMO_BUCKET = "dm-obs"
"""The bucket airflow-ui.sh seeds and its DAGs read (INSPECTION_BUCKET's default in scripts/lib.sh)."""
NEW_IMAGE_SEQ = 9001


def _needs(*keys: str) -> list[str]:
    missing = [key for key in keys if key not in CONSOLE]
    if missing:
        pytest.skip(f"an earlier Deployments step did not get as far as {missing}")
    return [CONSOLE[key] for key in keys]


def _index_publisher(airflow_ui: AirflowUI):
    """The CLIP indexes airflow-ui.sh's Airflow publishes (its INSPECTION_DATA_ROOT/clip_index, releases beside)."""
    from inspection_refresh.publish import Publisher

    return Publisher(Path(airflow_ui.env["INSPECTION_DATA_ROOT"]) / "clip_index")


def _manifest(airflow_ui: AirflowUI, version: str) -> dict:
    import json

    from inspection_refresh.clip.index import MANIFEST_FILE

    return json.loads((_index_publisher(airflow_ui).releases / "normal" / version / MANIFEST_FILE).read_text())


def _card(ui: BrowserUI, label: str = CLIP_LABEL):
    return ui.console.locator(f'article.card[data-artefact="{label}"]')


def _history_row(ui: BrowserUI, text: str):
    """The History row whose one-line summary contains ``text``."""
    console = ui.console
    return console.locator("details.history-row").filter(has=console.locator("summary", has_text=text))


def _new_normal_image(s3_server) -> tuple[object, str]:
    """Upload one more normal image of product 1 into the demo bucket, as the line PC would; (client, key)."""
    from inspection_refresh.dev.demo import IMAGE_SIZE, PRODUCTS, _jpeg
    from inspection_refresh.dev.samples import render_normal

    product = PRODUCTS[0]
    key = f"images/normal/{product.product_id}/{product.product_code}_OK_{NEW_IMAGE_SEQ:04d}.jpg"
    client = compose.object_storage(bucket=DEMO_BUCKET).client  # the session's S3 server (AIRFLOW_CONN_NCP_OBJECT_STORAGE)
    client.put_object(Bucket=DEMO_BUCKET, Key=key, Body=_jpeg(render_normal(0, seed=NEW_IMAGE_SEQ, size=IMAGE_SIZE)))
    return client, key


def test_demo_clip_run_succeeds_then_new_images_publish_a_second_version(airflow_ui, s3_server):
    """Phase A's clip_index_normal run succeeds (version 1); one new image arrives in the bucket and a second
    run (REST API, as the admin) publishes version 2 with one image more.

    A new image, not ``full_rebuild``: the second run then embeds one image instead of all 360 (about 2
    minutes less on 2 busy cores), and the two versions differ in what the card shows.
    """
    started = time.monotonic()
    first = DEMO_RUNS.get(CLIP_DAG) or (airflow_ui.newest_run(CLIP_DAG) or {}).get("dag_run_id")
    if first is None:  # phase B alone (-k): make the demo run now
        first = airflow_ui.trigger(CLIP_DAG)
    airflow_ui.wait_for_run_state(CLIP_DAG, first, {"success"}, timeout=RUN_TIMEOUT)
    first_done = time.monotonic() - started
    client, key = _new_normal_image(s3_server)
    try:
        second = airflow_ui.trigger(CLIP_DAG, note=f"browser test: after uploading {key}")
        airflow_ui.wait_for_run_state(CLIP_DAG, second, {"success"}, timeout=RUN_TIMEOUT)
    finally:  # the demo bucket as seeded again, for whatever runs after this module
        client.delete_object(Bucket=DEMO_BUCKET, Key=key)

    publisher = _index_publisher(airflow_ui)
    versions = publisher.versions("normal")
    assert len(versions) == 2, versions
    old, new = versions
    assert publisher.current("normal") == new
    assert publisher.pinned("normal") is None
    old_manifest, new_manifest = _manifest(airflow_ui, old), _manifest(airflow_ui, new)
    assert (old_manifest["run_id"], new_manifest["run_id"]) == (first, second)
    assert new_manifest["count"] == old_manifest["count"] + 1, (old_manifest["count"], new_manifest["count"])
    CONSOLE.update(first_run=first, second_run=second, old=old, new=new)
    COUNTS.update({old: old_manifest["count"], new: new_manifest["count"]})
    print(f"{CLIP_DAG}: demo run {first} success after {first_done:.0f}s (version {old}, "
          f"{old_manifest['count']} images); with {key} added, run {second} success after "
          f"{time.monotonic() - started:.0f}s (version {new}, {new_manifest['count']} images)")


def _wait_for_the_other_demo_runs(airflow_ui: AirflowUI) -> None:
    """For the docs picture only: every card filled (phase A's clip_index_defect and PatchCore runs ended)."""
    from tests.integration.airflow_browser import TERMINAL_RUN_STATES

    started = time.monotonic()
    for dag_id in ("clip_index_defect", "patchcore_memory_bank"):
        if dag_id in DEMO_RUNS:
            wait_until(lambda: airflow_ui.dag_run(dag_id, DEMO_RUNS[dag_id])["state"] in TERMINAL_RUN_STATES,
                       900, f"{dag_id}'s demo run to end")
    print(f"docs screenshots: waited {time.monotonic() - started:.0f}s for the other demo runs")


def test_deployments_page_from_the_browse_menu_shows_what_is_live(airflow_ui, ui):
    """Browse -> Deployments: the CLIP normal card shows version 2 live, its run, images, the random-weights
    badge, and both kept versions, the older one with a Roll back button."""
    from playwright.sync_api import expect

    second, old, new = _needs("second_run", "old", "new")
    count = COUNTS[new]
    docs = os.environ.get("INSPECTION_DOCS_SCREENSHOTS") == "1"
    if docs:
        _wait_for_the_other_demo_runs(airflow_ui)
    with ui.step("deployments-live-now"):
        console = ui.open_deployments()
        card = _card(ui)
        expect(card.get_by_role("heading", name="CLIP normal index")).to_be_visible()
        expect(card.locator("header .badge.live")).to_have_text(f"live {new}")
        expect(card.locator("header .badge.random")).to_have_text("random weights (demo/test)")
        expect(card.locator(".badge.pinned")).to_have_count(0)
        expect(card.locator(".live-since a.run-link")).to_have_text(f"{CLIP_DAG} run {second}")
        expect(card.locator(".live-since")).to_contain_text("published by")
        expect(card.locator('dl.facts dt:text-is("Images") + dd')).to_have_text(str(count))
        kept = card.locator("table.versions tbody tr")
        expect(kept).to_have_count(2)
        expect(kept.nth(0)).to_contain_text(new)  # newest first
        expect(kept.nth(0).locator(".badge.live")).to_be_visible()
        expect(kept.nth(0).get_by_role("button", name="Roll back")).to_have_count(0)
        expect(kept.nth(1)).to_contain_text(old)
        expect(kept.nth(1).get_by_role("button", name="Roll back")).to_be_visible()
        expect(console.locator(".notice.error")).to_have_count(0)
        labels = console.locator("article.card").evaluate_all("cards => cards.map(c => c.dataset.artefact)")
        ui.screenshot("deployments-live-now")
        ui.docs_screenshot("deployments-live")
    print(f"Live now: cards {labels}; {CLIP_LABEL} live {new}, {count} images, kept {new}, {old}; "
          f"address {ui.page.url}")


def test_history_shows_the_demo_runs(ui):
    """History: both clip_rebuild rows of clip_index_normal, completed; the older one expands to its message and run."""
    from playwright.sync_api import expect

    first, second, old, new = _needs("first_run", "second_run", "old", "new")
    with ui.step("deployments-history"):
        ui.console_nav("History")
        for version in (old, new):
            row = _history_row(ui, f"normal index, version {version}")
            expect(row).to_have_count(1)
            expect(row.locator(":scope > summary")).to_contain_text("clip_rebuild")
            expect(row.locator(":scope > summary .status")).to_have_text("completed")
        row = _history_row(ui, f"normal index, version {old}")
        expect(row.locator("pre.message")).to_be_hidden()
        row.locator(":scope > summary").click()
        message = row.locator("pre.message")
        expect(message).to_be_visible()
        expect(message).not_to_be_empty()
        expect(row.locator(".row-details a.run-link")).to_have_text(f"{CLIP_DAG} run {first}")
        ui.screenshot("deployments-history-clip-row")
        text = message.inner_text()
        total = ui.console.locator(".filters .count").inner_text()
    print(f"History: {total}; the demo run's message: {text[:300]!r}")


def test_roll_back_to_the_older_version_from_the_live_page(airflow_ui, ui):
    """Live now -> Roll back on the older kept version: the console triggers deployment_rollback through
    Airflow's REST API as the signed-in admin and shows the run; Airflow's audit log has the trigger."""
    from playwright.sync_api import expect

    old, new = _needs("old", "new")
    with ui.step("deployments-roll-back"):
        ui.console_nav("Live now")
        row = _card(ui).locator("table.versions tbody tr").filter(has_text=old)
        row.get_by_role("button", name="Roll back").click()
        result = ui.console.get_by_role("status")
        expect(result.get_by_role("heading")).to_have_text(f"Rollback of {CLIP_LABEL} to {old} requested")
        link = result.locator("a.run-link")
        expect(link).to_have_text(re.compile(rf"^{ROLLBACK_DAG} run \S+$"))
        run_id = link.inner_text().split(" run ", 1)[1].strip()
        expect(link).to_have_attribute("href", f"/dags/{ROLLBACK_DAG}/runs/{quote(run_id, safe='')}")
        ui.screenshot("deployments-rollback-requested")
    CONSOLE["rollback_run"] = run_id

    run = airflow_ui.dag_run(ROLLBACK_DAG, run_id)
    assert run["run_type"] == "manual", run
    assert run["conf"] == {"artefact": CLIP_LABEL, "version": old}, run
    assert run.get("triggering_user_name") == ADMIN_USER, run
    assert run.get("note") == f"Requested in the Deployments console by {ADMIN_USER}", run
    audit = [entry for entry in airflow_ui.event_logs(dag_id=ROLLBACK_DAG, event="trigger_dag_run")
             if old in (entry.get("extra") or "")]
    assert audit and audit[0]["owner"] == ADMIN_USER, audit
    state = airflow_ui.wait_for_run_state(ROLLBACK_DAG, run_id, {"success"}, timeout=RUN_TIMEOUT)
    print(f"Roll back: {ROLLBACK_DAG} run {run_id} {state}; audit log {audit[0]['event']} by {audit[0]['owner']} "
          f"at {audit[0]['when']}")


def test_reloading_after_a_roll_back_triggers_nothing_and_leads_back(airflow_ui, ui):
    """The UI's address follows the frame, so after Roll back it ends in ``/deployments/rollback``; reloading the
    page loads that address with GET: no second rollback run; the console answers with the Live now page."""
    from playwright.sync_api import expect

    (run_id,) = _needs("rollback_run")
    with ui.step("deployments-reload-after-rollback"):
        assert ui.page.url.endswith("/plugin/deployments/deployments/rollback"), ui.page.url
        ui.page.reload()
        expect(_card(ui)).to_be_visible()  # redirected to Live now
        ui.screenshot("deployments-reload-after-rollback")
    runs = airflow_ui.api("GET", f"/api/v2/dags/{ROLLBACK_DAG}/dagRuns", params={"limit": 50})["dag_runs"]
    console_runs = [run["dag_run_id"] for run in runs if (run.get("conf") or {}).get("version") == CONSOLE["old"]]
    assert console_runs == [run_id], console_runs


def test_after_the_rollback_the_older_version_is_live_and_pinned(airflow_ui, ui):
    """Deployments again (Browse menu): the older version is live and pinned (Unpin offered, the newer one can
    be rolled forward to); History has the run's ``rollback`` row with its message."""
    from playwright.sync_api import expect

    old, new, run_id = _needs("old", "new", "rollback_run")
    publisher = _index_publisher(airflow_ui)
    assert publisher.current("normal") == old
    pin = publisher.pinned("normal")
    assert pin and pin["version"] == old and pin["run_id"] == run_id, pin
    with ui.step("deployments-after-rollback"):
        ui.open_deployments()
        card = _card(ui)
        expect(card.locator("header .badge.live")).to_have_text(f"live {old}")
        expect(card.locator("header .badge.pinned")).to_be_visible()
        expect(card.locator('dl.facts dt:text-is("Images") + dd')).to_have_text(str(COUNTS[old]))
        # Made live by the rollback run, when it ran; built by the first demo run.
        expect(card.locator(".live-since a.run-link")).to_have_text(f"{ROLLBACK_DAG} run {run_id}")
        expect(card.locator(".live-since")).to_contain_text(
            re.compile(r"^Live since \d{4}-\d\d-\d\d [\d:]{8} UTC,\s+rolled back by"))
        expect(card.locator(".built a.run-link")).to_have_text(f"{CLIP_DAG} run {CONSOLE['first_run']}")
        expect(card.locator(".pin")).to_contain_text(f"Pinned to {old} by {pin['pinned_by']}")
        expect(card.locator(".pin").get_by_role("button", name="Unpin")).to_be_visible()
        kept = card.locator("table.versions tbody tr")
        expect(kept.filter(has_text=old).locator(".badge.live")).to_be_visible()
        expect(kept.filter(has_text=new).get_by_role("button", name="Roll forward")).to_be_visible()
        ui.screenshot("deployments-live-after-rollback")

    with ui.step("deployments-history-rollback"):
        ui.console_nav("History")
        row = _history_row(ui, f"{CLIP_LABEL}: {new} → {old}")
        expect(row).to_have_count(1)
        expect(row.locator(":scope > summary")).to_contain_text("rollback")
        expect(row.locator(":scope > summary .status")).to_have_text("completed")
        expect(row.locator(":scope > summary .what")).to_contain_text("rolled back")  # said while collapsed
        expect(row.locator(":scope > summary .started")).to_have_text(re.compile(r" UTC$"))
        row.locator(":scope > summary").click()
        expect(row.locator("pre.message")).to_contain_text(f"{CLIP_LABEL} rolled back from {new} to {old} by")
        expect(row.locator(".row-details a.run-link")).to_have_text(f"{ROLLBACK_DAG} run {run_id}")
        ui.screenshot("deployments-history-rollback-row")
        ui.docs_screenshot("deployments-history")
    print(f"after the rollback: {CLIP_LABEL} live {old} ({COUNTS[old]} images), pinned by {pin['pinned_by']}")


def test_an_unchanged_run_leaves_the_card_naming_the_run_that_made_the_version_live(airflow_ui, ui):
    """A manual CLIP run over the images of the live (rolled-back) version publishes nothing: the card still
    says the rollback made the version live, at the same time, and History says the run changed nothing."""
    from playwright.sync_api import expect

    old, run_id = _needs("old", "rollback_run")
    ui.open_deployments()
    since = _card(ui).locator(".live-since").inner_text()
    unchanged = airflow_ui.trigger(CLIP_DAG, note="browser test: nothing new in the bucket")
    airflow_ui.wait_for_run_state(CLIP_DAG, unchanged, {"success"}, timeout=RUN_TIMEOUT)
    assert _index_publisher(airflow_ui).current("normal") == old
    with ui.step("deployments-after-unchanged-run"):
        ui.open_deployments()
        card = _card(ui)
        expect(card.locator("header .badge.live")).to_have_text(f"live {old}")
        expect(card.locator(".live-since a.run-link")).to_have_text(f"{ROLLBACK_DAG} run {run_id}")
        expect(card.locator(".live-since")).to_have_text(since)
        expect(card).not_to_contain_text(unchanged)
        ui.console_nav("History")
        newest = ui.console.locator("details.history-row").first
        expect(newest.locator(":scope > summary .what")).to_contain_text("unchanged")
        ui.screenshot("deployments-after-unchanged-run")


def test_a_product_code_that_is_no_product_is_refused_or_fails_in_one_line(airflow_ui, ui):
    """A malformed product code never starts a run (the form's pattern, checked by the trigger API too); a
    well-formed code of no active product fails list_products at once, and the run's page shows one line
    naming it and the active products."""
    from playwright.sync_api import expect

    refused = requests.post(f"{airflow_ui.api_url}/api/v2/dags/{PATCHCORE_DAG}/dagRuns", timeout=60,
                            headers={"Authorization": f"Bearer {airflow_ui.token()}"},
                            json={"logical_date": None, "conf": {"products": ["TEX 01"]}})
    assert refused.status_code == 400 and "TEX 01" in refused.text, (refused.status_code, refused.text[:300])
    run_id = airflow_ui.trigger(PATCHCORE_DAG, {"products": ["NOPE99"]})
    airflow_ui.set_paused(PATCHCORE_DAG, False)
    wait_until(lambda: airflow_ui.dag_run(PATCHCORE_DAG, run_id)["state"] in ("failed", "success"), RUN_TIMEOUT * 1.5,
               f"{PATCHCORE_DAG} run {run_id} with an unknown product code to end")
    run = airflow_ui.dag_run(PATCHCORE_DAG, run_id)
    assert run["state"] == "failed", run
    note = wait_until(lambda: airflow_ui.dag_run(PATCHCORE_DAG, run_id).get("note"), 60, "the run's note")
    assert "unknown or inactive product code NOPE99" in note and "\n" not in note and "Traceback" not in note, note
    with ui.step("unknown-product-code-run"):
        ui.page.goto(f"{airflow_ui.base_url}/dags/{PATCHCORE_DAG}/runs/{run_id}")
        expect(ui.page.get_by_text("unknown or inactive product code NOPE99").first).to_be_visible(timeout=30_000)
        ui.screenshot("unknown-product-code-run")


def test_with_the_rollback_dag_paused_the_page_says_what_to_do_and_triggers_nothing(airflow_ui, ui):
    """Someone paused deployment_rollback: Roll forward starts nothing and the page says so, with the DAG's page
    and an "Unpause and roll forward" button; that button unpauses it and rolls forward, which goes live."""
    from playwright.sync_api import expect

    old, new = _needs("old", "new")
    airflow_ui.set_paused(ROLLBACK_DAG, True)
    runs_before = airflow_ui.api("GET", f"/api/v2/dags/{ROLLBACK_DAG}/dagRuns", params={"limit": 100})["total_entries"]
    with ui.step("deployments-rollback-dag-paused"):
        ui.open_deployments()
        kept = _card(ui).locator("table.versions tbody tr").filter(has_text=new)
        kept.get_by_role("button", name="Roll forward").click()
        result = ui.console.get_by_role("status")
        expect(result.get_by_role("heading")).to_have_text(
            f"Roll forward of {CLIP_LABEL} to {new} was not started: deployment_rollback is paused")
        expect(result).to_contain_text("Nothing was triggered")
        expect(result).not_to_contain_text("requested")
        expect(result.locator("a.dag-link").first).to_have_attribute("href", f"/dags/{ROLLBACK_DAG}")
        ui.screenshot("deployments-rollback-dag-paused")
    runs_after = airflow_ui.api("GET", f"/api/v2/dags/{ROLLBACK_DAG}/dagRuns", params={"limit": 100})["total_entries"]
    assert runs_after == runs_before, (runs_before, runs_after)

    with ui.step("deployments-unpause-and-roll-forward"):
        result.get_by_role("button", name="Unpause and roll forward").click()
        result = ui.console.get_by_role("status")
        expect(result.get_by_role("heading")).to_have_text(f"Roll forward of {CLIP_LABEL} to {new} requested")
        run_id = result.locator("a.run-link").inner_text().split(" run ", 1)[1].strip()
        ui.screenshot("deployments-unpaused-roll-forward-requested")
    assert airflow_ui.api("GET", f"/api/v2/dags/{ROLLBACK_DAG}")["is_paused"] is False
    airflow_ui.wait_for_run_state(ROLLBACK_DAG, run_id, {"success"}, timeout=RUN_TIMEOUT)
    assert _index_publisher(airflow_ui).current("normal") == new
    with ui.step("deployments-after-roll-forward"):
        ui.open_deployments()
        card = _card(ui)
        expect(card.locator("header .badge.live")).to_have_text(f"live {new}")
        expect(card.locator(".live-since")).to_contain_text(f"rolled forward by {ROLLBACK_DAG} run {run_id}")
        ui.screenshot("deployments-live-after-roll-forward")


def test_stopping_the_ui_leaves_no_airflow_process(airflow_ui):
    """Last: the script's stop (SIGTERM, as ``kill`` or stop-services.sh) ends every process, runs included."""
    for dag_id in DAG_IDS:  # where the runs got to (they are stopped with Airflow)
        runs = airflow_ui.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 10})["dag_runs"]
        print(f"{dag_id}: " + ", ".join(f"{run['dag_run_id']} {run['state']}" for run in runs))
    left, seconds = airflow_ui.stop()
    assert not left, f"still running {seconds:.0f}s after SIGTERM: " + "; ".join(
        f"{p.pid} {cmdline(p)[:80]}" for p in left)
    assert airflow_ui.script.returncode == 143
    assert not airflow_ui.pid_file.exists()
    print(f"stopped in {seconds:.1f}s; module so far {time.monotonic() - _MODULE_STARTED:.0f}s")
