"""The Deployments console: a small FastAPI app that Airflow's API server mounts (see
``plugins/deployments_console.py``) and the Airflow UI shows in a frame.

Pages are server-rendered HTML (Jinja2 templates and one CSS file shipped in this package; one small
script only refreshes Runs in progress), so they work offline and inside the UI's sandboxed frame:

- ``/``: **Live now**, the runs in progress (:mod:`.runs`: ``/runs.json``, and ``/runs/section`` which
  ``static/runs.js`` fetches into the page at once and every few seconds), then one card per artefact
  with its kept versions and Roll back buttons;
- ``/history``: ``deployment_logs``, newest first, filterable, paged;
- ``POST /rollback``: triggers ``deployment_rollback`` through Airflow's REST API as the user, never
  while that DAG is paused (the page says so, and offers to unpause it);
- ``/artefacts/patchcore/{name}/{version}/score_histogram.png``: that one file of a kept bank version.

With a release channel (``channel``/``both``) what is live, kept and pinned comes from the channel
(:mod:`.data`, :class:`~inspection_refresh.live.Releases`), so an API server without local roots
shows the right cards and accepts Roll back for what the channel keeps; an unreachable channel is
said on the cards, never an HTTP 500.

Every route, the stylesheet included, needs an Airflow sign-in (:mod:`.auth`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from inspection_refresh import compose
from inspection_refresh.config import Settings, get_settings
from inspection_refresh.console import data, runs
from inspection_refresh.console.airflow_api import (
    airflow_api_url, dag_paused, trigger_dag_run, unpause_dag, waiting_approvals,
)
from inspection_refresh.console.auth import (
    RELOAD_HINT, Viewer, ViewerDep, check_csrf, csrf_token, login_url, refusal_hint,
)
from inspection_refresh.console.history import ApprovalTask, history_page
from inspection_refresh.live import Releases
from inspection_refresh.publish import PublishError
from inspection_refresh.registry import DeploymentRegistry
from inspection_refresh.storage import StorageError
from inspection_refresh.tasks.common import ROLLBACK_DAG_ID
from inspection_refresh.tasks.rollback import CLIP_PREFIX

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STYLESHEET = PACKAGE_DIR / "static" / "console.css"
RUNS_SCRIPT = PACKAGE_DIR / "static" / "runs.js"

PAGE_HEADERS = {
    # Only Airflow's own UI may frame the pages (no clickjacking of Roll back), and they load nothing
    # but this app's stylesheet, pictures and one script file (runs.js refreshes Runs in progress from
    # this app): no inline scripts, no other origin.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'",
    "Cache-Control": "no-store",  # per-user pages with form tokens
}

SettingsSource = Callable[[], Settings]
RegistrySource = Callable[[Settings], DeploymentRegistry]


def _airflow_root() -> str:
    """Airflow's own path prefix (``/`` unless ``[api] base_url`` has a path), for links to its UI."""
    from airflow.api_fastapi.app import API_ROOT_PATH

    return API_ROOT_PATH or "/"


def run_url(run: data.RunRef | None) -> str | None:
    """The Airflow UI page of a DAG run."""
    if run is None:
        return None
    return f"{_airflow_root()}dags/{quote(run.dag_id, safe='')}/runs/{quote(run.run_id, safe='')}"


def dag_url(dag_id: str) -> str:
    """The Airflow UI page of a DAG (its pause toggle is there)."""
    return f"{_airflow_root()}dags/{quote(dag_id, safe='')}"


def required_actions_url(task: ApprovalTask) -> str:
    """The Airflow UI's Required Actions page of a task instance waiting for a person (mapped or not)."""
    base = f"{run_url(task.run)}/tasks/{quote(task.task_id, safe='')}"
    return f"{base}/mapped/{task.map_index}/required_actions" if task.map_index >= 0 else f"{base}/required_actions"


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _format_time(value: Any) -> str:
    """A time as ``2026-11-26 02:00:00 UTC``; ISO strings from JSON files too, other text as it is."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if not isinstance(value, datetime):
        return str(value)
    if value.tzinfo is None:
        return value.strftime("%Y-%m-%d %H:%M:%S")  # a database time in the server's zone
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _artefact(settings: Settings, label: str) -> tuple[str, Releases]:
    """(name, releases) of an artefact label from the form; ``ValueError`` if it names nothing published
    (in the channel, with one, or on this host)."""
    if label.startswith(CLIP_PREFIX):
        name, publisher = label[len(CLIP_PREFIX):], compose.index_publisher(settings)
    else:
        name, publisher = label, compose.patchcore_publisher(settings)
    releases = Releases(publisher)
    if name not in releases.names():
        raise ValueError(f"{label!r} is not a published artefact")
    return name, releases


def _check_rollback(releases: Releases, name: str, label: str, version: str) -> str | None:
    """The live version; ``ValueError`` unless ``version`` is kept (in the channel, or on this host: the
    rollback uploads such a version first) and not live."""
    if version not in releases.versions(name) and version not in releases.publisher.versions(name):
        raise ValueError(f"version {version!r} of {label} is not kept")
    live = releases.current(name)
    if version == live:
        raise ValueError(f"version {version} of {label} is already live")
    return live


def _what(action: str, artefact: str, version: str, live: str | None = None) -> str:
    """What was asked for, as the result page's heading starts: "Rollback of clip:normal to V"."""
    if action == "unpin":
        return f"Unpin of {artefact}"
    return f"{'Roll forward' if live and version > live else 'Rollback'} of {artefact} to {version}"


def create_app(*, settings: SettingsSource = get_settings,
               registry: RegistrySource = lambda s: compose.deployment_registry(s.db_conn_id),
               api_url: str | None = None) -> FastAPI:
    """The console app. ``settings``/``registry`` are read on every request (so a changed environment
    applies); ``api_url`` is where Airflow's REST API is (default: :func:`airflow_api_url`)."""
    app = FastAPI(title="Deployments", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    templates.env.globals.update(run_url=run_url, format_time=_format_time, dag_url=dag_url,
                                 required_actions_url=required_actions_url)

    def render(request: Request, template: str, viewer: Viewer | None, status_code: int = 200,
               **context: Any) -> HTMLResponse:
        prefix = request.scope.get("root_path", "").rstrip("/")
        return templates.TemplateResponse(
            request, template, {"prefix": prefix, "viewer": viewer, "airflow_root": _airflow_root(),
                                "csrf_token": csrf_token(viewer) if viewer else "", **context},
            status_code=status_code, headers=PAGE_HEADERS)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Anonymous browsers go to Airflow's sign-in page; other refusals get a page or JSON."""
        if exc.status_code == 401 and _wants_html(request):
            # After signing in, come back to this page; from a form, to the Live now page instead.
            back = (str(request.url) if request.method == "GET"
                    else f"{request.url.scheme}://{request.url.netloc}{request.scope.get('root_path', '')}/")
            return RedirectResponse(login_url(back), status_code=303)
        if _wants_html(request):
            return render(request, "error.html", None, exc.status_code, detail=exc.detail, hint=refusal_hint(exc))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def incomplete_form(request: Request, exc: RequestValidationError) -> Response:
        """A form without its fields (a page from before a restart, a hand-made request): one sentence, not
        FastAPI's validation JSON."""
        missing = sorted({str(error["loc"][-1]) for error in exc.errors() if error.get("loc")})
        detail = ("The form is incomplete or has expired" + (f" (missing: {', '.join(missing)})" if missing else "")
                  + ": reload the Deployments page and try again.")
        if _wants_html(request):
            return render(request, "error.html", None, 422, detail=detail, hint=RELOAD_HINT)
        return JSONResponse({"detail": detail}, status_code=422)

    def runs_now(viewer: Viewer) -> runs.RunsInProgress:
        """The viewer's runs in progress: Airflow's REST API with the viewer's token, figures from the rows."""
        return runs.runs_in_progress(
            runs.AirflowRuns(api_url or airflow_api_url(), viewer.token), registry(settings()),
            sorted(viewer.readable_dag_ids),
            run_url=lambda dag_id, run_id: run_url(data.RunRef(dag_id, run_id)) or "",
            approval_url=lambda dag_id, run_id: required_actions_url(
                ApprovalTask(data.RunRef(dag_id, run_id), runs.APPROVAL_TASK_ID, -1, "")))

    @app.get("/", response_class=HTMLResponse, name="live")
    def live(request: Request, viewer: ViewerDep) -> HTMLResponse:
        current = settings()
        cards, problems = data.live_cards(current, registry(current), viewer.readable_dag_ids)
        # Runs in progress are fetched by the page's script (at once, then every few seconds), so the
        # page itself never waits for Airflow's REST API.
        return render(request, "live.html", viewer, cards=cards, problems=problems, page_name="live",
                      runs=None, refresh_seconds=runs.REFRESH_SECONDS)

    @app.get("/runs.json", name="runs_json")
    def runs_json(viewer: ViewerDep) -> JSONResponse:
        """Runs in progress as data (the figures of the page's section)."""
        return JSONResponse(runs_now(viewer).as_json(), headers={"Cache-Control": "no-store"})

    @app.get("/runs/section", response_class=HTMLResponse, name="runs_section")
    def runs_section(request: Request, viewer: ViewerDep) -> HTMLResponse:
        """The page's Runs in progress section alone, which runs.js fetches every few seconds."""
        return render(request, "_runs.html", viewer, runs=runs_now(viewer), refresh_seconds=runs.REFRESH_SECONDS)

    @app.get("/history", response_class=HTMLResponse, name="history")
    def history(request: Request, viewer: ViewerDep, deploy_type: str = "", status: str = "",
                page: str = "1") -> HTMLResponse:
        current = settings()
        page_number = int(page) if page.isdigit() and int(page) > 0 else 1
        # Users who may not read every DAG of the package see only the rows of those they may.
        dag_ids = None if viewer.reads_every_dag else sorted(viewer.readable_dag_ids)
        result = history_page(registry(current), page=page_number, deploy_type=deploy_type[:50] or None,
                              status=status[:20] or None, dag_ids=dag_ids,
                              waiting=lambda: waiting_approvals(api_url or airflow_api_url(), viewer.token))
        filters = {k: v for k, v in (("deploy_type", deploy_type), ("status", status)) if v}

        def page_link(number: int) -> str:
            return "?" + urlencode({**filters, "page": number})

        return render(request, "history.html", viewer, history=result, filters=filters, page_link=page_link,
                      page_name="history")

    @app.get("/artefacts/patchcore/{name}/{version}/score_histogram.png", name="histogram")
    def histogram(name: str, version: str, viewer: ViewerDep) -> Response:
        if data.PATCHCORE_DAG_ID not in viewer.readable_dag_ids:
            raise StarletteHTTPException(403, "You may not read the PatchCore DAG's runs.")
        try:
            found = data.histogram(settings(), name, version)
        except StorageError as exc:
            raise StarletteHTTPException(502, data.unreachable(exc)) from None
        if found is None:
            raise StarletteHTTPException(404, "No such histogram.")
        # A version's files never change once published.
        headers = {"Cache-Control": "private, max-age=86400"}
        if isinstance(found, bytes):
            return Response(found, media_type="image/png", headers=headers)
        return FileResponse(found, media_type="image/png", headers=headers)

    @app.get("/static/console.css", name="stylesheet")
    def stylesheet(viewer: ViewerDep) -> FileResponse:
        return FileResponse(STYLESHEET, media_type="text/css", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/static/runs.js", name="runs_script")
    def runs_script(viewer: ViewerDep) -> FileResponse:
        return FileResponse(RUNS_SCRIPT, media_type="text/javascript", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/rollback", include_in_schema=False)
    def rollback_page(request: Request, viewer: ViewerDep) -> RedirectResponse:
        """A reload (or bookmark) of a rollback's result page: back to Live now, never a second trigger."""
        return RedirectResponse(f"{request.scope.get('root_path', '').rstrip('/')}/", status_code=303)

    @app.post("/rollback", response_class=HTMLResponse, name="rollback")
    def rollback(request: Request, viewer: ViewerDep, artefact: Annotated[str, Form()],
                 csrf: Annotated[str, Form(alias="csrf_token")], version: Annotated[str, Form()] = "",
                 action: Annotated[str, Form()] = "rollback", unpause: Annotated[str, Form()] = "") -> HTMLResponse:
        if not viewer.can_trigger_rollback:
            raise StarletteHTTPException(403, f"You may not trigger {ROLLBACK_DAG_ID}.")
        check_csrf(request, viewer, csrf)
        if action not in ("rollback", "unpin"):
            raise StarletteHTTPException(400, f"unknown action {action!r}")

        def result(code: int, **context: Any) -> HTMLResponse:
            return render(request, "rollback_result.html", viewer, code, artefact=artefact, version=version,
                          action=action, **{"ok": False, "run": None, "paused": False, "what": what, **context})

        what = _what(action, artefact, version)
        try:
            name, releases = _artefact(settings(), artefact)
            if action == "rollback":
                what = _what(action, artefact, version, _check_rollback(releases, name, artefact, version))
        except StorageError as exc:  # nothing is triggered while what is kept and live is unknown
            return result(502, detail=data.unreachable(exc))
        except (ValueError, OSError, PublishError) as exc:
            return result(400, detail=str(exc))
        api = api_url or airflow_api_url()
        # A run of a paused DAG waits in the queue and changes nothing: never "requested" then.
        if unpause:
            if not viewer.can_unpause_rollback:
                raise StarletteHTTPException(403, f"You may not unpause {ROLLBACK_DAG_ID}.")
            refused = unpause_dag(api, viewer.token, ROLLBACK_DAG_ID)
            if refused:
                return result(502, detail=f"{refused}; nothing was triggered.")
        else:
            state = dag_paused(api, viewer.token, ROLLBACK_DAG_ID)
            if state.paused is None:
                return result(502, detail=f"could not ask Airflow whether {ROLLBACK_DAG_ID} is paused, so nothing "
                                          f"was triggered: {state.error}")
            if state.paused:
                return result(409, paused=True, can_unpause=viewer.can_unpause_rollback,
                              detail=f"{ROLLBACK_DAG_ID} is paused in Airflow, so its run would wait and change "
                                     "nothing. Nothing was triggered.")
        run_conf: dict[str, Any] = ({"artefact": artefact, "version": version} if action == "rollback"
                                    else {"artefact": artefact, "unpin": True})
        triggered = trigger_dag_run(api, viewer.token, ROLLBACK_DAG_ID, run_conf,
                                    note=f"Requested in the Deployments console by {viewer.name}")
        run = data.RunRef(ROLLBACK_DAG_ID, triggered.run_id) if triggered.run_id else None
        code = (200 if triggered.ok
                else triggered.status_code if triggered.status_code and triggered.status_code >= 400 else 502)
        return result(code, ok=triggered.ok, detail=triggered.detail, run=run, unpaused=bool(unpause))

    return app
