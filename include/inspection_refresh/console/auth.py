"""Who is asking, and what Airflow lets them do: the console's only source of identity and permission.

A FastAPI app mounted by a plugin inherits no authentication from Airflow's API server, so every
route depends on :func:`current_viewer`, which uses Airflow's own dependency
(:func:`airflow.api_fastapi.core_api.security.get_user`): a ``Authorization: Bearer`` header or the
``_token`` JWT cookie the Airflow UI sets, checked by the configured auth manager. Permissions are
the auth manager's answers for this package's DAGs (``is_authorized_dag``), the same checks
Airflow's REST API makes for reading DAG runs and triggering one.

The credential the request came with is kept (:attr:`Viewer.token`) so a rollback is triggered
through Airflow's REST API as this user, never with a credential of the console's own.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials
from itsdangerous import BadSignature, URLSafeTimedSerializer

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep, bearer_scheme
from airflow.configuration import conf

from inspection_refresh.console.data import PACKAGE_DAG_IDS
from inspection_refresh.tasks.common import ROLLBACK_DAG_ID

CSRF_MAX_AGE_SECONDS = 12 * 3600
_CSRF_SALT = "inspection-refresh-deployments-console"
# Used only when Airflow has no [api] secret_key: forms then work within this process only.
_FALLBACK_SECRET = secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Viewer:
    """The signed-in user of one request and what they may do here."""

    user: BaseUser
    token: str
    """The JWT this request was authenticated with (Bearer header, else the UI's cookie)."""
    readable_dag_ids: frozenset[str]
    """This package's DAGs whose runs the user may read."""
    can_trigger_rollback: bool
    """Whether the user may trigger ``deployment_rollback`` (POST on its DAG runs)."""

    @property
    def name(self) -> str:
        return self.user.get_name()

    @property
    def reads_every_dag(self) -> bool:
        return self.readable_dag_ids == frozenset(PACKAGE_DAG_IDS)

    @property
    def can_unpause_rollback(self) -> bool:
        """Whether the user may edit ``deployment_rollback`` (PUT on the DAG: its pause toggle)."""
        return may(self.user, "PUT", ROLLBACK_DAG_ID)


ACCESS_HINT = "Refused? Ask an Airflow administrator for access to this package's DAG runs."
RELOAD_HINT = "Nothing was done. Reload the Deployments page (Browse → Deployments) and press the button again."


class Refusal(HTTPException):
    """A refused request with what to do about it (``hint``), shown under the reason on the error page."""

    def __init__(self, status_code: int, detail: str, hint: str | None = None) -> None:
        super().__init__(status_code, detail)
        self.hint = hint


def refusal_hint(exc: Exception) -> str | None:
    """What the error page suggests: a :class:`Refusal`'s own hint; for any other 403, asking for access."""
    if isinstance(exc, Refusal):
        return exc.hint
    return ACCESS_HINT if getattr(exc, "status_code", None) == status.HTTP_403_FORBIDDEN else None


def _team_name(dag_id: str) -> str | None:
    """The DAG's team, which multi-team auth managers need; only looked up in multi-team mode."""
    if not conf.getboolean("core", "multi_team", fallback=False):
        return None
    from airflow.models.dag import DagModel

    return DagModel.get_team_name(dag_id)


def may(user: BaseUser, method: str, dag_id: str, access_entity: DagAccessEntity | None = None) -> bool:
    """The auth manager's answer: may ``user`` do ``method`` on ``dag_id`` (its runs, with ``access_entity``)?"""
    return get_auth_manager().is_authorized_dag(
        method=method, access_entity=access_entity, details=DagDetails(id=dag_id, team_name=_team_name(dag_id)),
        user=user)


def _request_token(request: Request, bearer: HTTPAuthorizationCredentials | None) -> str:
    """The credential ``get_user`` accepted: an explicit Bearer header wins over the cookie, as there."""
    if bearer and bearer.scheme.lower() == "bearer":
        return bearer.credentials
    return request.cookies.get(COOKIE_NAME_JWT_TOKEN, "")


def current_viewer(request: Request, user: GetUserDep,
                   bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]) -> Viewer:
    """FastAPI dependency: the signed-in user, refused (403) unless they may read runs of one of this
    package's DAGs. An anonymous request never gets here: ``get_user`` answers 401 first."""
    readable = frozenset(d for d in PACKAGE_DAG_IDS if may(user, "GET", d, DagAccessEntity.RUN))
    if not readable:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "You may not read the runs of this package's deployment DAGs.")
    return Viewer(user=user, token=_request_token(request, bearer), readable_dag_ids=readable,
                  can_trigger_rollback=may(user, "POST", ROLLBACK_DAG_ID, DagAccessEntity.RUN))


ViewerDep = Annotated[Viewer, Depends(current_viewer)]


def _csrf_serializer() -> URLSafeTimedSerializer:
    secret = conf.get("api", "secret_key", fallback=None) or _FALLBACK_SECRET
    return URLSafeTimedSerializer(secret, salt=_CSRF_SALT)


def csrf_token(viewer: Viewer) -> str:
    """A form token bound to this user, signed with Airflow's ``[api] secret_key``."""
    return _csrf_serializer().dumps(viewer.user.get_id())


def check_csrf(request: Request, viewer: Viewer, token: str) -> None:
    """Refuse (403) a state-changing request not made from our own page.

    Two checks: the form token must be one we signed for this user in the last
    :data:`CSRF_MAX_AGE_SECONDS`, and a browser's ``Origin`` header, when present, must be this
    server's. The token matters even with a SameSite cookie: with
    ``simple_auth_manager_all_admins`` Airflow authenticates every request, from any page.
    """
    origin = request.headers.get("origin")
    if origin is not None and origin.rstrip("/").split("://", 1)[-1] != request.headers.get("host", ""):
        raise Refusal(status.HTTP_403_FORBIDDEN,
                      f"This request came from another site ({origin[:100]}), not from the Deployments page, "
                      "so it was refused.",
                      "Nothing was done. To roll back or unpin, open Browse → Deployments in Airflow itself and "
                      "press the button there.")
    try:
        signed_for = _csrf_serializer().loads(token, max_age=CSRF_MAX_AGE_SECONDS)
    except BadSignature:
        raise Refusal(status.HTTP_403_FORBIDDEN,
                      "The form has expired or did not come from the Deployments page.", RELOAD_HINT) from None
    if signed_for != viewer.user.get_id():
        raise Refusal(status.HTTP_403_FORBIDDEN, "The form was made for another user.", RELOAD_HINT)


def login_url(next_url: str) -> str:
    """The auth manager's sign-in page, returning to ``next_url`` afterwards."""
    return get_auth_manager().get_url_login(next_url=next_url)
