"""The "Deployments" console in the Airflow UI: what is live, the deployment history, and rollbacks.

Airflow's API server mounts the app at ``/deployments`` and the UI lists it in its Browse menu,
shown inside the UI's frame. The pages, their authentication (Airflow's own sign-in and
permissions) and the rollback forwarding (Airflow's REST API, as the signed-in user) live in
``inspection_refresh.console``; the app is built on its first request, so the other Airflow
processes that load this folder pay nothing for it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin

from inspection_refresh.console import URL_PREFIX, LazyConsoleApp

# Airflow serves everything under the path of [api] base_url (usually "/"), so the frame must too.
_ROOT_PATH = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


class DeploymentsConsolePlugin(AirflowPlugin):
    name = "Deployments"
    fastapi_apps = [{"app": LazyConsoleApp(), "url_prefix": URL_PREFIX, "name": "Deployments"}]
    external_views = [{
        "name": "Deployments",
        "href": f"{_ROOT_PATH}{URL_PREFIX}/",
        "url_route": "deployments",  # the UI shows it at /plugin/deployments
        "destination": "nav",
        "category": "browse",
    }]
