"""The Deployments console: what is live, the deployment history and rollbacks, inside the Airflow UI.

:mod:`.app` is the FastAPI app (``create_app``), :mod:`.data` gathers what the pages show,
:mod:`.auth` asks Airflow who the user is and what they may do, and :mod:`.airflow_api` triggers
rollbacks through Airflow's REST API. ``plugins/deployments_console.py`` mounts a
:class:`LazyConsoleApp`, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

URL_PREFIX = "/deployments"
"""Where the plugin mounts the console in Airflow's API server."""


class LazyConsoleApp:
    """An ASGI app that builds the console (``create_app()``) on its first request.

    Every Airflow process loads the plugins folder (scheduler, DAG processor, task processes), but
    only the API server serves the console; building it eagerly would cost each of them about a
    second of imports (FastAPI, Airflow's API security stack).
    """

    def __init__(self) -> None:
        self._app: Any = None

    @property
    def app(self) -> Any:
        if self._app is None:
            from inspection_refresh.console.app import create_app

            self._app = create_app()
        return self._app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def __repr__(self) -> str:
        return "inspection_refresh.console.LazyConsoleApp()"
