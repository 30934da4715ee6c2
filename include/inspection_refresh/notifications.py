"""Tell people when they must act: a deployment run failed, an approval is waiting, an artefact was
rolled back.

Each event is an Airflow notifier (a ``BaseNotifier``): the DAGs' failure callback
(:func:`inspection_refresh.operators.close_deployment_on_failure`) calls :class:`RunFailedNotifier`,
the approval step passes :class:`ApprovalWaitingNotifier` as its HITL ``notifiers``, and the
``deployment_rollback`` DAG has :class:`RollbackNotifier` as its success callback; so each event
sends one message, never one per task try. A message goes to every route that is configured, each
by an Airflow connection, all off by default (:class:`~inspection_refresh.config.Settings`):

- e-mail through the SMTP provider's ``SmtpNotifier``: ``INSPECTION_NOTIFY_SMTP_CONN_ID`` and
  ``INSPECTION_NOTIFY_EMAIL_TO`` (``INSPECTION_NOTIFY_EMAIL_FROM``, else the connection's ``from_email``);
- chat through the Apprise provider's ``AppriseNotifier``: ``INSPECTION_NOTIFY_APPRISE_CONN_ID``, an
  ``apprise`` connection whose URL names Slack, Teams, a webhook, ...

Built at DAG parse time, so building reads nothing: settings, connections and the deployment record
are read when the event happens, and the providers are imported then. A route that fails is logged;
a notification never fails the task or callback that sends it.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from airflow.sdk.bases.notifier import BaseNotifier

from inspection_refresh import compose
from inspection_refresh.config import Settings, get_settings
from inspection_refresh.tasks.rollback import DEPLOY_TYPE as ROLLBACK_DEPLOY_TYPE

log = logging.getLogger(__name__)

NO_BASE_URL = "set [api] base_url (AIRFLOW__API__BASE_URL) for a link"


@dataclass(frozen=True)
class Notice:
    """One event's message: a title (the e-mail subject), plain-text lines, and where to act."""

    title: str
    text: str
    link: str | None
    link_label: str
    level: str = "info"
    """Apprise's notify type: ``info``, ``warning``, ``failure`` or ``success``."""

    def plain(self) -> str:
        return f"{self.text}\n\n{self.link_label}: {self.link or NO_BASE_URL}"

    def html(self) -> str:
        link = (f'<a href="{html.escape(self.link)}">{html.escape(self.link)}</a>' if self.link
                else html.escape(NO_BASE_URL))
        return (f'<pre style="font-family: inherit; white-space: pre-wrap">{html.escape(self.text)}</pre>'
                f"<p>{html.escape(self.link_label)}: {link}</p>")


def airflow_base_url() -> str | None:
    """Where the Airflow UI is: ``[api] base_url``; ``None`` when it is not set."""
    from airflow.providers.common.compat.sdk import conf

    return (conf.get("api", "base_url", fallback=None) or "").rstrip("/") or None


def run_link(dag_id: str, run_id: str) -> str | None:
    """The run's page in the Airflow UI, or ``None`` without ``[api] base_url``."""
    base = airflow_base_url()
    return f"{base}/dags/{quote(dag_id)}/runs/{quote(run_id, safe='')}" if base else None


def routes_configured(settings: Settings) -> bool:
    return bool(settings.notify_smtp_conn_id or settings.notify_apprise_conn_id)


def send(notice: Notice, settings: Settings) -> list[str]:
    """Send ``notice`` through every configured route; returns the routes that took it (errors are logged)."""
    sent = []
    for route, deliver in (("e-mail", _send_email), ("apprise", _send_apprise)):
        try:
            if deliver(notice, settings):
                sent.append(route)
        except Exception as exc:  # a notification must never fail the task or callback sending it
            log.error("Could not send the notification %r by %s (%s: %s); check the connection named in the "
                      "INSPECTION_NOTIFY_* settings", notice.title, route, type(exc).__name__, exc)
    if sent:
        # Apprise reports a service that refused the message only in its own warning, not to the caller.
        log.info("Notification passed to %s: %s", " and ".join(sent), notice.title)
    return sent


def _send_email(notice: Notice, settings: Settings) -> bool:
    if not settings.notify_smtp_conn_id:
        return False
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    # notify() with no context, not __call__: the text is final, never a Jinja template of the run's context
    # (which, in a DAG callback, may hold a serialized DAG that cannot render one).
    SmtpNotifier(to=list(settings.notify_email_to), from_email=settings.notify_email_from, subject=notice.title,
                 html_content=notice.html(), smtp_conn_id=settings.notify_smtp_conn_id).notify({})
    return True


def _send_apprise(notice: Notice, settings: Settings) -> bool:
    if not settings.notify_apprise_conn_id:
        return False
    from airflow.providers.apprise.notifications.apprise import AppriseNotifier
    from apprise import NotifyType

    AppriseNotifier(body=notice.plain(), title=notice.title, notify_type=NotifyType(notice.level),
                    apprise_conn_id=settings.notify_apprise_conn_id).notify({})
    return True


def deployment_record(dag_id: str, run_id: str, settings: Settings) -> tuple[dict[str, Any] | None, str]:
    """(the run's ``deployment_logs`` row or ``None``, a line saying what it records)."""
    try:
        row = compose.deployment_registry(settings=settings).find_run(dag_id, run_id)
    except Exception as exc:
        return None, f"Deployment record: could not be read ({type(exc).__name__}: {exc})."
    if row is None:
        return None, "Deployment record: none (the run failed before opening one)."
    return row, (f"Deployment record #{row['deploy_id']} ({row['deploy_type']}, {row['status']}): "
                 f"{row['result_message']}")


class DeploymentNotifier(BaseNotifier):
    """Sends one event's :class:`Notice` through the configured routes; nothing when none is configured.

    Subclasses say what the event's message is (:meth:`notice`), from the context Airflow passes.
    """

    def notice(self, context: Mapping[str, Any], settings: Settings) -> Notice | None:
        raise NotImplementedError

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Nothing to render: the message is built from the run when the event happens."""

    def notify(self, context: Any) -> None:
        try:
            settings = get_settings()
            if not routes_configured(settings):
                return
            notice = self.notice(context, settings)
        except Exception:  # never fail the caller; say what could not be told
            log.exception("Could not build the %s notification", type(self).__name__)
            return
        if notice is not None:
            send(notice, settings)


class RunFailedNotifier(DeploymentNotifier):
    """A deployment run failed: the DAG and run, its deployment record's message, a link to the run.

    :param describe_failure: why Airflow failed the run, in words, from the callback's context
        (``reason``, the failed task); said when the run has no deployment record.
    """

    def __init__(self, *, describe_failure: Callable[[Mapping[str, Any]], str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.describe_failure = describe_failure

    def notice(self, context: Mapping[str, Any], settings: Settings) -> Notice:
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        _, record = deployment_record(dag_id, run_id, settings)
        why = self.describe_failure(context) if self.describe_failure else context.get("reason") or "failed"
        return Notice(
            title=f"Deployment run failed: {dag_id} {run_id}",
            text=f"Airflow DAG {dag_id}, run {run_id}, failed: {why}.\n{record}",
            link=run_link(dag_id, run_id), link_label="The run in Airflow", level="failure")


class ApprovalWaitingNotifier(DeploymentNotifier):
    """An approval is waiting: what would change (the request's subject and body) and a link to the
    approve task's Required actions page. A HITL notifier: Airflow calls it once the request is written."""

    def notice(self, context: Mapping[str, Any], settings: Settings) -> Notice:
        task, dag_id, run_id = context["task"], context["dag"].dag_id, context["run_id"]
        try:
            link = task.generate_link_to_ui_from_context(context=context)
        except ValueError:  # no [api] base_url
            link = None
        until = (getattr(task, "hitl_summary_extra", None) or {}).get("timeout_datetime")  # set before notifying
        deadline = f"Answer by {datetime.fromisoformat(until):%Y-%m-%d %H:%M} UTC" if until else "Answer"
        return Notice(
            title=f"Approval needed: {task.subject}",
            text=(f"Airflow DAG {dag_id}, run {run_id}, waits for Approve or Reject before publishing.\n"
                  f"{deadline}; without an answer nothing is published.\n\n{task.subject}\n\n{task.body or ''}"),
            link=link, link_label="Approve or reject on the Required actions page", level="warning")


class RollbackNotifier(DeploymentNotifier):
    """A rollback happened (or a pin was removed): who, from which version, to which one; the
    ``deployment_rollback`` DAG's success callback, read from the run's ``rollback`` record."""

    def notice(self, context: Mapping[str, Any], settings: Settings) -> Notice | None:
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        row, record = deployment_record(dag_id, run_id, settings)
        if row is None or row["deploy_type"] != ROLLBACK_DEPLOY_TYPE:
            log.warning("No rollback notification for %s run %s: %s", dag_id, run_id, record)
            return None
        data, by = row.get("result_data") or {}, row.get("deployed_by") or "unknown"
        artefact, before, after = data.get("artefact"), data.get("from_version"), data.get("to_version")
        if data.get("action") == "unpin":
            title = f"{artefact} unpinned by {by}"
            facts = f"Who: {by}\nLive version (stays): {before}"
        else:
            title = f"{artefact} rolled back from {before} to {after} by {by}"
            facts = f"Who: {by}\nFrom version: {before}\nTo version: {after}"
        return Notice(title=title, text=f"{title}.\n{facts}\n{record}", link=run_link(dag_id, run_id),
                      link_label="The run in Airflow", level="warning")
