"""A real ``scripts/airflow-ui.sh`` with sign-in, and a signed-in headless Chromium, for the browser tests.

:class:`AirflowUI` starts the script (``airflow standalone``) on free ports with its files in temporary
directories, with ``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False`` and a known admin password,
waits until the API server, scheduler and DAG processor are up and the DAGs are parsed, talks to the
REST API with a token from ``POST /auth/token``, and stops everything the way a user does (SIGTERM to
the script, whose ``stop_airflow`` ends standalone's whole session). Starting and stopping are the shared
harness's (:class:`~tests.integration.airflow_processes.AirflowUIScript`).

:class:`BrowserUI` drives Playwright's page: :meth:`~BrowserUI.sign_in` on SimpleAuthManager's login
page, :meth:`~BrowserUI.trigger_with_defaults` on a DAG page, :meth:`~BrowserUI.open_deployments` from the
UI's Browse menu (the console plugin, in the UI's frame), :meth:`~BrowserUI.screenshot` of each step,
:meth:`~BrowserUI.docs_screenshot` for ``docs/``, :meth:`~BrowserUI.dump` of screenshot + HTML when
something fails.

How the Airflow 3.x UI shows a plugin's ``external_views`` entry with ``destination: nav`` (its compiled
``ui/dist``): the entry is an item of the navigation's menu named by ``category`` ("Browse"); the item
opens ``/plugin/<url_route>``, a page holding an ``<iframe title="<name>" sandbox="allow-scripts
allow-same-origin allow-forms allow-downloads">`` on ``href``. The UI follows the frame's own navigation
into its address bar (``/plugin/<url_route><path inside the frame>``), so a reload stays on the same page.

How SimpleAuthManager signs people in (Airflow 3.x, ``airflow/api_fastapi/auth/managers/simple``):
users and roles come from ``[core] simple_auth_manager_users`` (default ``admin:admin``); passwords from
the JSON file ``[core] simple_auth_manager_passwords_file`` (default
``$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated``). On start it only *adds* a generated
password for a user the file lacks, so a file written beforehand with ``{"admin": "<password>"}`` fixes
the password. The login page (``/auth/login?next=...``, "Sign into Airflow", fields Username and
Password, button "Sign in") posts to ``POST /auth/token`` and stores the returned JWT in the ``_token``
cookie, which the UI and its API calls then use. Scripts send the same JWT as
``Authorization: Bearer <token>``: ``POST /auth/token`` with JSON ``{"username", "password"}``
answers 201 ``{"access_token": ...}`` (``GET /auth/token`` works only with all-admins on).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import requests

from tests.conftest import REPO
from tests.integration.airflow_processes import AirflowUIScript, wait_until

ADMIN_USER = "admin"
START_TIMEOUT = 300.0
"""Seeding the demo samples (~40 s) + migrating the metadata DB + standalone's start-up (30-60 s) on 2 busy cores."""
STOP_TIMEOUT = 60.0
"""The script's stop: SIGTERM, then SIGKILL after INSPECTION_STOP_GRACE_SECONDS (10 s); torch tasks may be running."""
REST_TIMEOUT = 90
"""One REST call's limit: on 2 cores shared with torch tasks (and other test sessions) 30 s was seen to run out."""
TERMINAL_RUN_STATES = {"success", "failed"}
UI_STATE_LABELS = {"queued": "Queued", "running": "Running", "success": "Success", "failed": "Failed"}
"""Dag-run states as the UI's English locale writes them (``common.json`` ``states``)."""
CONSOLE_FRAME = 'iframe[title="Deployments"]'
"""The Deployments console's frame on its plugin page (the iframe's title is the external view's name)."""
DOCS_DIR = REPO / "docs"
DOCS_SCREENSHOTS_ENV = "INSPECTION_DOCS_SCREENSHOTS"
"""``1``: :meth:`BrowserUI.docs_screenshot` (re)writes the pictures in ``docs/`` that README.md shows."""
DOCS_MAX_BYTES = 300_000
DOCS_NAV_WIDTH, DOCS_MARGIN, DOCS_MIN_HEIGHT = 80, 24, 300
"""Docs pictures: the UI's navigation bar (left, px), the space kept below the content, the least height."""


@dataclass
class AirflowUI(AirflowUIScript):
    """``scripts/airflow-ui.sh`` started with ``env``, sign-in required; REST calls as the signed-in admin."""

    password: str = field(kw_only=True)
    start_timeout: float = START_TIMEOUT
    stop_timeout: float = STOP_TIMEOUT
    _token: str = ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def write_password(airflow_home: Path, password: str, user: str = ADMIN_USER) -> Path:
        """Fix the user's password: SimpleAuthManager keeps a password it finds in its file."""
        airflow_home.mkdir(parents=True, exist_ok=True)
        path = airflow_home / "simple_auth_manager_passwords.json.generated"
        path.write_text(json.dumps({user: password}) + "\n")
        return path

    def wait_ready(self, dag_ids: Iterable[str], timeout: float = START_TIMEOUT) -> None:
        """The admin gets a token, the scheduler and DAG processor report healthy and every DAG is parsed."""
        wanted = set(dag_ids)

        def ready() -> bool:
            assert self.script is not None and self.script.poll() is None, (
                f"airflow-ui.sh exited:\n{self.log_tail()}")
            try:
                health = requests.get(f"{self.api_url}/api/v2/monitor/health", timeout=10).json()
                if any((health.get(part) or {}).get("status") != "healthy"
                       for part in ("metadatabase", "scheduler", "dag_processor")):
                    return False
                dags = self.api("GET", "/api/v2/dags", params={"limit": 100})["dags"]
            except (requests.RequestException, ValueError):
                return False
            return wanted <= {dag["dag_id"] for dag in dags}

        wait_until(ready, timeout, f"a healthy Airflow with DAGs {sorted(wanted)}", interval=2.0)

    # ---------------------------------------------------------------------------------------- REST API
    def token(self, refresh: bool = False) -> str:
        """A JWT for the admin: ``POST /auth/token`` with the user name and password."""
        if refresh or not self._token:
            response = requests.post(f"{self.api_url}/auth/token", timeout=30,
                                     json={"username": ADMIN_USER, "password": self.password})
            assert response.status_code == 201, f"POST /auth/token: {response.status_code} {response.text}"
            self._token = response.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = requests.request(method, f"{self.api_url}{path}", timeout=REST_TIMEOUT,
                                    headers={"Authorization": f"Bearer {self.token()}"}, **kwargs)
        if response.status_code == 401:  # expired token: once more with a fresh one
            response = requests.request(method, f"{self.api_url}{path}", timeout=REST_TIMEOUT,
                                        headers={"Authorization": f"Bearer {self.token(refresh=True)}"}, **kwargs)
        assert response.ok, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.json() if response.content else None

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{requests.utils.quote(run_id, safe='')}")

    def wait_for_run_state(self, dag_id: str, run_id: str, states: Iterable[str], timeout: float = 180.0) -> str:
        """Wait until the run is in one of ``states`` and return it; fail at once on another final state."""
        wanted = set(states)

        def reached() -> str | None:
            state = self.dag_run(dag_id, run_id)["state"]
            if state in wanted:
                return state
            assert state not in TERMINAL_RUN_STATES, f"{dag_id} run {run_id} ended {state}, wanted {sorted(wanted)}"
            return None

        return wait_until(reached, timeout, f"{dag_id} run {run_id} in {sorted(wanted)}")

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": paused})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, note: str | None = None) -> str:
        """``POST /api/v2/dags/{dag_id}/dagRuns`` as the admin (a manual run, no logical date); its run id."""
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if note:
            body["note"] = note
        return self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def newest_run(self, dag_id: str, run_type: str = "manual") -> dict | None:
        """The DAG's newest run of ``run_type`` (by start of its creation), or None."""
        runs = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns",
                        params={"limit": 20, "order_by": "-run_after"})["dag_runs"]
        return next((run for run in runs if run["run_type"] == run_type), None)

    def event_logs(self, **params: Any) -> list[dict]:
        """Airflow's audit log (``GET /api/v2/eventLogs``), newest first."""
        return self.api("GET", "/api/v2/eventLogs", params={"order_by": "-when", "limit": 50, **params})["event_logs"]


class BrowserUI:
    """The signed-in Playwright page, with a screenshot per step in ``shots``."""

    def __init__(self, page: Any, airflow: AirflowUI, shots: Path, copy_to: Path | None = None) -> None:
        self.page = page
        self.airflow = airflow
        self.shots = shots
        self.copy_to = copy_to
        self._count = 0
        shots.mkdir(parents=True, exist_ok=True)
        if copy_to is not None:
            copy_to.mkdir(parents=True, exist_ok=True)

    def screenshot(self, name: str, full_page: bool = True) -> Path:
        """Save ``NN-name.png`` in ``shots`` (and a copy in ``copy_to``); return its path."""
        self._count += 1
        path = self.shots / f"{self._count:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        if self.copy_to is not None:
            shutil.copy2(path, self.copy_to / path.name)
        return path

    def dump(self, name: str) -> None:
        """For debugging a failure: screenshot, page HTML and the script's log, never raising."""
        for target in filter(None, (self.shots, self.copy_to)):
            try:
                stem = target / f"FAILED-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}"
                self.page.screenshot(path=f"{stem}.png", full_page=True)
                Path(f"{stem}.html").write_text(self.page.content())
                Path(f"{stem}.url").write_text(self.page.url + "\n")
                shutil.copy2(self.airflow.log_path, target / "airflow-ui.log")
            except Exception as error:  # noqa: BLE001 - best effort while reporting another failure
                print(f"could not save the failure artefacts in {target}: {error!r}")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A step: on any exception save screenshot + HTML named after it, then re-raise."""
        try:
            yield
        except BaseException:
            self.dump(name)
            raise

    # ------------------------------------------------------------------------------------------ pages
    def sign_in(self, user: str = ADMIN_USER, password: str | None = None) -> None:
        """Open the UI, land on SimpleAuthManager's login page, sign in, and see the Airflow home page."""
        from playwright.sync_api import expect

        page = self.page
        with self.step("sign-in"):
            page.goto(f"{self.airflow.base_url}/")
            expect(page.get_by_text("Sign into Airflow")).to_be_visible()
            assert "/auth/login" in page.url, page.url
            page.get_by_label("Username").fill(user)
            page.get_by_label("Password").fill(password if password is not None else self.airflow.password)
            self.screenshot("login-page")
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(lambda url: "/auth/" not in url)
            # the main UI's navigation (the link to the DAG list) shows it is signed in
            expect(page.get_by_role("link", name=re.compile(r"^Dags$", re.I)).first).to_be_visible()
            assert any(c["name"] == "_token" for c in page.context.cookies()), "no _token cookie after sign-in"
            self.screenshot("signed-in-home")

    def open_dag(self, dag_id: str) -> None:
        from playwright.sync_api import expect

        self.page.goto(f"{self.airflow.base_url}/dags/{dag_id}")
        expect(self.page.get_by_role("button", name="Trigger Dag")).to_be_visible()
        expect(self.page.get_by_text(dag_id).first).to_be_visible()

    def trigger_with_defaults(self, dag_id: str) -> str:
        """On the DAG page: Trigger, submit the form as it opens, return the run id the UI then shows."""
        from playwright.sync_api import expect

        page = self.page
        with self.step(f"trigger-{dag_id}"):
            self.open_dag(dag_id)
            self.screenshot(f"{dag_id}-dag-page")
            page.get_by_role("button", name="Trigger Dag").click()
            dialog = page.get_by_role("dialog")
            expect(dialog.get_by_text("Trigger Dag").first).to_be_visible()
            submit = dialog.get_by_role("button", name="Trigger", exact=True)
            # enabled once the DAG's params are loaded and valid
            expect(submit).to_be_enabled()
            self.screenshot(f"{dag_id}-trigger-form")
            submit.click()
            # on success the UI shows "Dag Run Triggered" and moves to the new run's page
            pattern = re.compile(rf"/dags/{re.escape(dag_id)}/runs/([^/?#]+)")
            page.wait_for_url(pattern)
            run_id = unquote(pattern.search(page.url).group(1))
            self.screenshot(f"{dag_id}-run-page")
        return run_id

    def run_header(self, run_id: str) -> Any:
        """The run page's header card (title = run id, state badge, Logical Date, Triggering User...)."""
        return self.page.get_by_test_id("header-card").filter(has_text=run_id)

    def see_run_state(self, dag_id: str, run_id: str, states: Iterable[str], live_seconds: float = 30.0) -> str:
        """The run's page shows one of ``states`` in its header badge; return the label seen.

        The page refreshes an active run by itself; if the badge has not caught up after ``live_seconds``
        the page is reloaded once (the REST API already said where the run is).
        """
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import expect

        labels = "|".join(UI_STATE_LABELS[state] for state in states)
        url = f"{self.airflow.base_url}/dags/{dag_id}/runs/{requests.utils.quote(run_id, safe='')}"
        with self.step(f"state-{dag_id}"):
            if f"/dags/{dag_id}/runs/" not in self.page.url:
                self.page.goto(url)
            badge = self.run_header(run_id).get_by_text(re.compile(rf"^\s*({labels})\s*$")).first
            try:
                expect(badge).to_be_visible(timeout=live_seconds * 1000)
            except (AssertionError, PlaywrightError):
                print(f"{dag_id}: the run page did not show {labels} by itself in {live_seconds:.0f}s; reloading it")
                self.page.reload()
                expect(badge).to_be_visible()
            seen = badge.inner_text().strip()
            self.screenshot(f"{dag_id}-run-{seen.lower()}")
        return seen

    # -------------------------------------------------------------------------------- the Deployments console
    @property
    def console(self) -> Any:
        """The Deployments console inside the UI's frame (a Playwright ``FrameLocator``)."""
        return self.page.frame_locator(CONSOLE_FRAME)

    def open_deployments(self) -> Any:
        """From the Airflow home page: Browse -> Deployments; the console's Live now page in the UI's frame."""
        from playwright.sync_api import expect

        page = self.page
        page.goto(f"{self.airflow.base_url}/")
        page.get_by_role("button", name="Browse").click()
        item = page.get_by_role("menuitem", name="Deployments")
        expect(item).to_be_visible()
        self.screenshot("browse-menu")
        item.click()
        page.wait_for_url(re.compile(r"/plugin/deployments(/|$|\?)"))
        console = self.console
        expect(console.get_by_role("heading", name="Deployments", exact=True)).to_be_visible()
        expect(console.get_by_role("link", name="Live now")).to_have_attribute("aria-current", "page")
        expect(console.get_by_text(f"Signed in as {ADMIN_USER}")).to_be_visible()
        return console

    def console_nav(self, name: str) -> None:
        """Follow the console's own navigation (``Live now``, ``History``) and wait for the page."""
        from playwright.sync_api import expect

        link = self.console.locator("header.top nav").get_by_role("link", name=name, exact=True)
        link.click()
        expect(link).to_have_attribute("aria-current", "page")

    def docs_screenshot(self, name: str, target: Any = None, max_bytes: int = DOCS_MAX_BYTES) -> Path | None:
        """With ``INSPECTION_DOCS_SCREENSHOTS=1``: the viewport (or ``target``, a locator) as ``docs/<name>.png``.

        Empty space below the page's content is cut off (the UI's navigation bar, left, runs the full
        height); the picture is made smaller than ``max_bytes`` by reducing it to a 256-colour palette
        (flat UI pictures stay sharp) and, if needed, scaling it down. Returns the path, or None when not
        asked for.
        """
        if os.environ.get(DOCS_SCREENSHOTS_ENV) != "1":
            return None
        from PIL import Image, ImageChops

        DOCS_DIR.mkdir(exist_ok=True)
        path = DOCS_DIR / f"{name}.png"
        raw = self.shots / f"docs-{name}-raw.png"
        (target.screenshot if target is not None else self.page.screenshot)(path=str(raw))
        image = Image.open(raw).convert("RGB")
        content = image.crop((DOCS_NAV_WIDTH, 0, image.width, image.height))
        background = Image.new("RGB", content.size, content.getpixel((content.width - 1, content.height - 1)))
        box = ImageChops.difference(content, background).getbbox()
        if box and box[3] + DOCS_MARGIN < image.height:
            image = image.crop((0, 0, image.width, max(box[3] + DOCS_MARGIN, DOCS_MIN_HEIGHT)))
        while True:
            image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                path, optimize=True)
            if path.stat().st_size <= max_bytes or image.width < 600:
                break
            image = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.Resampling.LANCZOS)
        print(f"docs screenshot {path} ({image.width}x{image.height}, {path.stat().st_size // 1024} KB)")
        return path
