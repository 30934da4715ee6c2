"""Notifications end to end: a failed run, a waiting approval and a rollback each send exactly one
message, through the providers' notifiers, to a real SMTP server (aiosmtpd on a free port) and a real
HTTP endpoint (Apprise's ``json://`` service); nothing is sent while notifications are off.

DAGs run through ``dag.test()`` with the real parts of the other DAG tests: MariaDB for the deployment
records, the Airflow metadata DB, and for the approval the NCP-like S3 server, open_clip and FAISS.
The connections are ``AIRFLOW_CONN_*`` environment variables, as a deployment may set them.
"""

from __future__ import annotations

import email
import email.policy
import html
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest

from tests.conftest import _free_port
from tests.integration.dag_runner import REPO, clip_dag_env, run_dag
from tests.integration.test_approval import Approver, airflow_api  # noqa: F401
from tests.integration.test_clip_dag import deployment_row, seed_normal

pytestmark = pytest.mark.slow

BASE_URL = "http://airflow.example.test:8080"
SENDER = "airflow@example.test"
RECIPIENTS = ("ops@example.test", "ml-platform@example.test")


class Inbox:
    """What the local SMTP server received: parsed messages, in order."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # aiosmtpd's handler hook
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 Message accepted for delivery"

    @staticmethod
    def text(message) -> str:
        """The HTML body as a reader sees it: without tags, unescaped."""
        return html.unescape(re.sub(r"<[^>]+>", "", message.get_body(("html",)).get_content()))


@pytest.fixture
def inbox():
    from aiosmtpd.controller import Controller

    received = Inbox()
    port = _free_port()
    controller = Controller(received, hostname="127.0.0.1", port=port)
    controller.start()
    received.connection = json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port, "extra": {
        "disable_ssl": True, "disable_tls": True, "from_email": SENDER, "retry_limit": 0, "timeout": 10}})
    yield received
    controller.stop()


@pytest.fixture
def chat():
    """A tiny HTTP endpoint that records what is POSTed to it (the JSON Apprise's ``json://`` sends)."""
    posts: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append({"path": self.path, **json.loads(self.rfile.read(int(self.headers["Content-Length"])))})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"json://127.0.0.1:{server.server_address[1]}/hooks/deployments", "posts": posts}
    server.shutdown()
    server.server_close()


@pytest.fixture
def deploy(mysql_database, airflow_db, sql, tmp_path, monkeypatch):
    """Published roots and a cache of the test's own; the ``sql`` fixture to read deployment rows."""
    monkeypatch.setenv("INSPECTION_INDEX_ROOT", str(tmp_path / "clip_index"))
    monkeypatch.setenv("INSPECTION_CACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", BASE_URL)
    return sql


@pytest.fixture
def email_on(inbox, monkeypatch) -> Inbox:
    """E-mail notifications on, through an ``smtp`` connection to the local server."""
    monkeypatch.setenv("AIRFLOW_CONN_NOTIFY_SMTP", inbox.connection)
    monkeypatch.setenv("INSPECTION_NOTIFY_SMTP_CONN_ID", "notify_smtp")
    monkeypatch.setenv("INSPECTION_NOTIFY_EMAIL_TO", ", ".join(RECIPIENTS))
    return inbox


def failing_rollback(sql) -> tuple[str, dict]:
    """A deployment_rollback run that fails (an artefact that does not exist); (run id, its deployment row)."""
    result = run_dag("deployment_rollback", {"artefact": "clip:bogus"})
    assert result.state == "failed", result.task_states
    row = deployment_row(sql, result.run_id)
    assert row["status"] == "failed" and "unknown CLIP index 'clip:bogus'" in row["result_message"]
    return result.run_id, row


def test_a_failed_run_sends_one_email_with_its_record_and_a_link(deploy, email_on):
    run_id, row = failing_rollback(deploy)

    [mail] = email_on.messages  # one message for the run, although two of its tasks failed
    assert mail["Subject"] == f"Deployment run failed: deployment_rollback {run_id}"
    assert mail["From"] == SENDER and mail["To"] == ", ".join(RECIPIENTS)
    text = Inbox.text(mail)
    assert f"Airflow DAG deployment_rollback, run {run_id}, failed: task register failed." in text, text
    assert f"Deployment record #{row['deploy_id']} (rollback, failed): {row['result_message']}" in text, text
    link = f"{BASE_URL}/dags/deployment_rollback/runs/{quote(run_id, safe='')}"
    assert f'<a href="{link}">' in mail.get_body(("html",)).get_content()


def test_nothing_is_sent_while_notifications_are_off(deploy, inbox, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_NOTIFY_SMTP", inbox.connection)  # a connection exists, the setting is unset
    failing_rollback(deploy)
    assert inbox.messages == []


def test_a_rollback_sends_who_rolled_back_from_which_version_to_which(deploy, email_on, tmp_path):
    from inspection_refresh.publish import Publisher

    publisher = Publisher(tmp_path / "clip_index")
    older, newer = "20260101T000000000000Z", "20260102T000000000000Z"
    for version in (older, newer):
        staging = publisher.stage("normal")
        (staging / "manifest.json").write_text(json.dumps({"version": version}))
        publisher.publish("normal", staging, version)

    result = run_dag("deployment_rollback", {"artefact": "clip:normal"})
    assert result.state == "success", result.task_states
    row = deployment_row(deploy, result.run_id)
    by = row["deployed_by"]
    assert by.startswith("airflow")

    [mail] = email_on.messages
    assert mail["Subject"] == f"clip:normal rolled back from {newer} to {older} by {by}"
    text = Inbox.text(mail)
    assert f"Who: {by}\nFrom version: {newer}\nTo version: {older}\n" in text, text
    assert row["result_message"] in text
    assert f"{BASE_URL}/dags/deployment_rollback/runs/{quote(result.run_id, safe='')}" in text


def test_the_chat_route_posts_the_message_through_apprise(deploy, chat, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_NOTIFY_CHAT", json.dumps(
        {"conn_type": "apprise", "extra": {"config": {"path": chat["url"]}}}))
    monkeypatch.setenv("INSPECTION_NOTIFY_APPRISE_CONN_ID", "notify_chat")
    run_id, row = failing_rollback(deploy)

    [post] = chat["posts"]
    assert post["path"] == "/hooks/deployments" and post["type"] == "failure"
    assert post["title"] == f"Deployment run failed: deployment_rollback {run_id}"
    assert row["result_message"] in post["message"]
    assert f"The run in Airflow: {BASE_URL}/dags/deployment_rollback/runs/{quote(run_id, safe='')}" in post["message"]


def test_e_mail_on_without_recipients_is_refused_with_what_to_set(monkeypatch):
    from inspection_refresh.config import Settings

    monkeypatch.setenv("INSPECTION_NOTIFY_SMTP_CONN_ID", "notify_smtp")
    monkeypatch.delenv("INSPECTION_NOTIFY_EMAIL_TO", raising=False)
    with pytest.raises(ValueError, match="INSPECTION_NOTIFY_EMAIL_TO is empty: set the recipients"):
        Settings.from_env()


def test_parsing_the_dags_with_notifications_on_reads_no_connection_and_loads_no_provider():
    """Connections that do not exist: parsing must not notice, nor import the SMTP or Apprise notifiers
    (they are built, and their connections read, when an event happens)."""
    script = (
        "import sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "assert len(bag.dags) == 4, sorted(bag.dags)\n"
        "loaded = [m for m in ('apprise', 'airflow.providers.smtp.notifications.smtp',\n"
        "                      'airflow.providers.apprise.notifications.apprise') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "INSPECTION_NOTIFY_SMTP_CONN_ID": "no_such_smtp",
           "INSPECTION_NOTIFY_EMAIL_TO": "a@example.test", "INSPECTION_NOTIFY_APPRISE_CONN_ID": "no_such_chat"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------------------------------------------- approval (CLIP)


@pytest.fixture
def clip(s3_server, deploy, clip_checkpoint, sql, tmp_path, monkeypatch):
    return clip_dag_env("notify", clip_checkpoint, sql, tmp_path, monkeypatch)


def test_a_waiting_approval_sends_its_summary_and_link_once_then_the_rejection_fails_the_run(
        clip, email_on, airflow_api):  # noqa: F811
    seed_normal(clip["put"], per_product=1)
    with Approver(airflow_api, "clip_index_normal", "bob", "Reject") as approver:
        result = run_dag("clip_index_normal", {"require_approval": True})
    approver.check()
    assert result.state == "failed" and result.task_states["approve"] == "success"

    asked, failed = email_on.messages  # one for the request, one for the run it ended
    request = approver.request
    assert asked["Subject"] == f"Approval needed: {request['subject']}"
    text = Inbox.text(asked)
    assert f"Airflow DAG clip_index_normal, run {result.run_id}, waits for Approve or Reject" in text
    assert re.search(r"Answer by \d{4}-\d\d-\d\d \d\d:\d\d UTC; without an answer nothing is published", text), text
    raw = asked.get_body(("html",)).get_content()
    for line in request["body"].strip().splitlines():  # what would change, as the Required actions page shows it
        assert html.escape(line) in raw, line
    link = f"{BASE_URL}/dags/clip_index_normal/runs/{result.run_id}/tasks/approve/required_actions?map_index=-1"
    assert f"Approve or reject on the Required actions page: {link}" in text, text

    assert failed["Subject"] == f"Deployment run failed: clip_index_normal {result.run_id}"
    row = deployment_row(clip["sql"], result.run_id)
    assert "rejected by bob" in row["result_message"] and row["result_message"] in Inbox.text(failed)
