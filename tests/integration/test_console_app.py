"""The Deployments console (plugin ``Deployments``) against real parts: versions published with
``Publisher`` into a temporary root, ``deployment_logs`` on the real MariaDB (a scratch database of
its own), Airflow's SimpleAuthManager issuing real JWTs, and the app mounted by Airflow's own
``init_plugins`` from the plugins folder, as the API server mounts it. Only Airflow's REST API is
stood in for, by a small local HTTP server that records what the console sends it.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
from inspection_refresh import compose
from inspection_refresh.publish import Publisher

CONN_ID = "console_db"
NORMAL_VERSIONS = ["20261101T020000000000Z", "20261102T020000000000Z", "20261103T020000000000Z"]
BANK_VERSIONS = ["20261105T100000000000Z", "20261106T100000000000Z"]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32 + b"histogram of BRKT01"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def console_database(mysql_database):
    """A database of this module's own on the real MariaDB, reached through the connection ``console_db``."""
    import MySQLdb

    settings = {k: mysql_database[k] for k in ("host", "port", "user", "password")}
    name = f"console_test_{uuid.uuid4().hex[:8]}"
    conn = MySQLdb.connect(**settings, autocommit=True)
    conn.cursor().execute(f"CREATE DATABASE `{name}`")
    variable = f"AIRFLOW_CONN_{CONN_ID.upper()}"
    os.environ[variable] = json.dumps({"conn_type": "mysql", "host": settings["host"], "port": settings["port"],
                                       "login": settings["user"], "password": settings["password"], "schema": name})
    yield {**settings, "database": name}
    os.environ.pop(variable, None)
    conn.cursor().execute(f"DROP DATABASE `{name}`")
    conn.close()


@pytest.fixture
def registry(console_database, monkeypatch):
    """An empty ``deployment_logs`` for each test."""
    import MySQLdb


    monkeypatch.setenv("INSPECTION_DB_CONN_ID", CONN_ID)
    conn = MySQLdb.connect(**console_database, autocommit=True)
    conn.cursor().execute("DROP TABLE IF EXISTS deployment_logs")
    conn.close()
    registry = compose.deployment_registry(CONN_ID)
    registry.ensure_tables()
    return registry


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """Empty CLIP and PatchCore roots (with their default releases directories) for this test."""
    monkeypatch.setenv("INSPECTION_INDEX_ROOT", str(tmp_path / "clip_index"))
    monkeypatch.setenv("INSPECTION_PATCHCORE_ROOT", str(tmp_path / "patchCore"))
    monkeypatch.delenv("INSPECTION_INDEX_RELEASES", raising=False)
    monkeypatch.delenv("INSPECTION_PATCHCORE_RELEASES", raising=False)
    from inspection_refresh.config import get_settings

    settings = get_settings()
    return compose.index_publisher(settings), compose.patchcore_publisher(settings)


class AirflowApiStub:
    """Stands in for Airflow's REST API: records each trigger (``requests``) and every other call
    (``calls``); answers a trigger with ``reply``, ``GET /api/v2/dags/<id>`` with ``paused``, an unpause
    by clearing it, and ``.../hitlDetails`` with ``hitl_details``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.calls: list[tuple[str, str]] = []
        self.paused = False
        self.hitl_details: list[dict] = []
        self.reply: tuple[int, dict] = (200, {"dag_run_id": "manual__2026-11-28T10:00:00+00:00_AbCd1234",
                                              "dag_id": "deployment_rollback", "state": "queued"})
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path.endswith("/dagRuns/list"):  # the Live page's runs in progress: none
                    stub.calls.append(("POST", self.path))
                    return self.answer(200, {"dag_runs": [], "total_entries": 0})
                stub.requests.append({"path": self.path, "authorization": self.headers.get("authorization"),
                                      "json": json.loads(body)})
                self.answer(*stub.reply)

            def do_GET(self) -> None:  # noqa: N802
                stub.calls.append(("GET", self.path))
                if "/hitlDetails" in self.path:
                    self.answer(200, {"hitl_details": stub.hitl_details, "total_entries": len(stub.hitl_details)})
                else:
                    self.answer(200, {"dag_id": self.path.rsplit("/", 1)[-1], "is_paused": stub.paused})

            def do_PATCH(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                stub.calls.append(("PATCH", self.path))
                stub.paused = bool(body["is_paused"])
                self.answer(200, {"dag_id": "deployment_rollback", "is_paused": stub.paused})

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def airflow_api(monkeypatch):
    stub = AirflowApiStub()
    monkeypatch.setenv("INSPECTION_AIRFLOW_API_URL", stub.url)
    yield stub
    stub.close()


@pytest.fixture(scope="module")
def auth_manager(airflow_db):
    """Airflow's configured auth manager (SimpleAuthManager), initialised as the API server does."""
    from airflow.api_fastapi.app import init_auth_manager

    return init_auth_manager()


@pytest.fixture(scope="module")
def tokens(auth_manager):
    """Real JWTs for users of different roles (SimpleAuthManager: admin, viewer, and no role at all)."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return {name: auth_manager.generate_jwt(SimpleAuthManagerUser(username=name, role=role))
            for name, role in (("alice", "admin"), ("bob", "admin"), ("victor", "viewer"), ("nobody", None))}


@pytest.fixture(scope="module")
def client(auth_manager):
    """The API server's way: Airflow's ``init_plugins`` mounts every app of the plugins folder."""
    from airflow.api_fastapi.app import init_plugins
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    root = FastAPI()
    init_plugins(root)
    with TestClient(root) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- helpers
def publish_clip(publisher: Publisher, name: str, version: str, manifest: dict | str) -> None:
    staging = publisher.stage(name)
    (staging / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    publisher.publish(name, staging, version)


def clip_manifest(version: str, pretrained: str = "openai", count: int = 12) -> dict:
    return {"format": 1, "index_type": "normal", "model": "ViT-B-32", "pretrained": pretrained, "count": count,
            "dim": 512, "version": version, "model_identity": f"ViT-B-32/{pretrained}|open_clip-3.3.0|prep-v1",
            "source_bucket": "dm-obs", "source_prefix": "images/normal/", "run_id": f"manual__{version}",
            "created_at": "2026-11-02T02:00:05+00:00"}


def publish_bank(publisher: Publisher, code: str, version: str, weights: str = "random",
                 histogram: bytes | None = PNG) -> None:
    staging = publisher.stage(code)
    config = {"layers": ["layer2", "layer3"], "shorter": 256, "stride": 1, "backbone": "resnet50",
              "weights": {"name": weights, "sha256": "ab" * 32}, "feature_dim": 1536, "bank_size": 4096,
              "num_images": 40, "created": "2026-11-06T10:00:07+00:00",
              "calibration": {"auroc": 0.9375, "accuracy_at_tau": 0.875, "tau": {"pixel": 1.5, "image": 2.25}}}
    (staging / "bank_config.json").write_text(json.dumps(config))
    (staging / "tau.json").write_text(json.dumps({"pixel": 1.5, "image": 2.25}))
    if histogram is not None:
        (staging / "score_histogram.png").write_bytes(histogram)
    publisher.publish(code, staging, version)


def card_html(page: str, label: str) -> str:
    match = re.search(rf'<article class="card"[^>]*data-artefact="{re.escape(label)}">(.*?)</article>', page, re.S)
    assert match, f"no card for {label}"
    return match.group(1)


def rollback_buttons(card: str) -> list[str]:
    """The versions a card offers a Roll back (or Roll forward) button for."""
    return re.findall(r'name="version" value="([^"]+)">\s*<input type="hidden" name="action" value="rollback">', card)


def button_labels(card: str) -> dict[str, str]:
    """Each kept version's button label: ``Roll back`` or ``Roll forward``."""
    return dict(re.findall(r'name="version" value="([^"]+)">\s*<input type="hidden" name="action" value="rollback">'
                           r'\s*<button[^>]*>([^<]+)</button>', card))


def text_of(html: str, css_class: str) -> str:
    """The text of the first ``<p class="css_class">`` of ``html``, tags removed, spaces collapsed."""
    match = re.search(rf'<p class="{css_class}">(.*?)</p>', html, re.S)
    assert match, f"no {css_class} in {html[:300]}"
    return " ".join(re.sub(r"<[^>]+>", " ", match.group(1)).split()).replace(" ,", ",")


def link_time(publisher: Publisher, name: str) -> str:
    """When the live link of ``name`` was swapped, as the page writes times."""
    from datetime import datetime, timezone

    moment = datetime.fromtimestamp(os.lstat(publisher.live_path(name)).st_mtime, timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def csrf_from(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def publish_the_deployments(index, banks, registry, normal_manifest=clip_manifest) -> None:
    """CLIP normal: three versions (their manifest.json from ``normal_manifest(version)``), rolled back (and
    pinned) to the middle one; bank BRKT01: two versions; and the rows their runs recorded."""
    for version in NORMAL_VERSIONS:
        publish_clip(index, "normal", version, normal_manifest(version))
    index.rollback("normal", NORMAL_VERSIONS[1], pinned_by="airflow:alice", run_id="manual__rollback-1")
    for version in BANK_VERSIONS:
        publish_bank(banks, "BRKT01", version)
    registry.finish("clip_rebuild", "clip_index_normal", f"manual__{NORMAL_VERSIONS[1]}", status="completed",
                    message="normal index published", deployed_by="airflow:alice",
                    result_data={"index_type": "normal", "version": NORMAL_VERSIONS[1], "random_weights": False})
    registry.finish("patchcore_create", "patchcore_memory_bank", "scheduled__2026-11-06T10:00:00+00:00",
                    status="completed", message="1 PatchCore bank published", deployed_by="airflow-scheduler",
                    result_data={"products": {"BRKT01": {"status": "published", "version": BANK_VERSIONS[1],
                                                         "bank_size": 4096, "tau": {"pixel": 1.5, "image": 2.25}}}})


@pytest.fixture
def published(roots, registry):
    """CLIP normal: three versions, rolled back (and pinned) to the middle one; a random-weights bank."""
    index, banks = roots
    publish_the_deployments(index, banks, registry)
    return index, banks


# --------------------------------------------------------------------------- Live now
def test_cards_show_the_live_version_kept_versions_pin_and_random_weights(client, tokens, published):
    response = client.get("/deployments/", headers=bearer(tokens["alice"]))
    assert response.status_code == 200, response.text
    assert "frame-ancestors 'self'" in response.headers["content-security-policy"]
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy  # no inline scripts, no other origin
    page = response.text

    normal = card_html(page, "clip:normal")
    assert f"live {NORMAL_VERSIONS[1]}" in normal and ">pinned<" in normal
    assert "by airflow:alice" in normal and "manual__rollback-1" in normal  # who pinned it, from which run
    assert "Unpin" in normal
    # Every kept version with its date; Roll back for each but the live one.
    for version in NORMAL_VERSIONS:
        assert version in normal
    assert "2026-11-01 02:00:00 UTC" in normal
    assert rollback_buttons(normal) == [NORMAL_VERSIONS[2], NORMAL_VERSIONS[0]]  # newest first
    # Made live by the rollback that pinned it (no rollback row: the pin names its run), when the live link
    # was swapped; built by the run that published it, linked to its Airflow run page.
    assert text_of(normal, "live-since") == (f"Live since {link_time(published[0], 'normal')}, rolled back by "
                                             "deployment_rollback run manual__rollback-1 (airflow:alice)")
    assert 'href="/dags/deployment_rollback/runs/manual__rollback-1"' in normal
    run_id = f"manual__{NORMAL_VERSIONS[1]}"
    assert text_of(normal, "built") == f"Built 2026-11-02 02:00:05 UTC by clip_index_normal run {run_id}"
    assert f'href="/dags/clip_index_normal/runs/{quote(run_id, safe="")}"' in normal
    assert button_labels(normal) == {NORMAL_VERSIONS[2]: "Roll forward", NORMAL_VERSIONS[0]: "Roll back"}
    assert "<dd>12</dd>" in normal and "ViT-B-32/openai|open_clip-3.3.0|prep-v1" in normal
    assert "random weights" not in normal

    assert "Nothing published yet." in card_html(page, "clip:defect")

    bank = card_html(page, "BRKT01")
    assert f"live {BANK_VERSIONS[1]}" in bank and "pinned" not in bank
    assert "random weights (demo/test)" in bank
    assert "4096 × 1536" in bank and "2.2500 / 1.5000" in bank  # bank size; tau image / pixel
    assert "0.938" in bank and "0.875" in bank  # held-out AUROC, accuracy at tau
    assert f'src="/deployments/artefacts/patchcore/BRKT01/{BANK_VERSIONS[1]}/score_histogram.png"' in bank
    assert text_of(bank, "live-since") == (f"Live since {link_time(published[1], 'BRKT01')}, published by "
                                           "patchcore_memory_bank run scheduled__2026-11-06T10:00:00+00:00 "
                                           "(airflow-scheduler)")
    assert text_of(bank, "built") == "Built 2026-11-06 10:00:07 UTC"  # by the run that made it live: said once
    assert button_labels(bank) == {BANK_VERSIONS[0]: "Roll back"}


def test_cards_name_the_run_that_made_the_live_version_live_and_when(client, tokens, roots, registry):
    """An "unchanged" run names the live version too: the card still credits the run that published it, and
    after a rollback (or a roll forward) the rollback's run; "Live since" is when the live link was swapped."""
    index, _ = roots
    old, new = NORMAL_VERSIONS[:2]
    for version, run in ((old, "manual__built-old"), (new, "manual__built-new")):
        publish_clip(index, "normal", version, clip_manifest(version))
        registry.finish("clip_rebuild", "clip_index_normal", run, status="completed", deployed_by="airflow:alice",
                        message=f"normal index version {version} published",
                        result_data={"index_type": "normal", "version": version, "unchanged": False})
    published_at = link_time(index, "normal")
    time.sleep(1.1)  # an unchanged run later: the live link is not touched
    registry.finish("clip_rebuild", "clip_index_normal", "scheduled__unchanged-1", status="completed",
                    deployed_by="airflow-scheduler", message=f"normal index unchanged, version {new} stays live",
                    result_data={"index_type": "normal", "version": new, "unchanged": True})

    def card() -> str:
        return card_html(client.get("/deployments/", headers=bearer(tokens["alice"])).text, "clip:normal")

    assert text_of(card(), "live-since") == (f"Live since {published_at}, published by clip_index_normal run "
                                             "manual__built-new (airflow:alice)")
    assert "scheduled__unchanged-1" not in card()

    def roll(to: str, before: str, run: str) -> None:
        index.rollback("normal", to, pinned_by="airflow:bob", run_id=run)
        registry.finish("rollback", "deployment_rollback", run, status="completed", deployed_by="airflow:bob",
                        message=f"clip:normal rolled back from {before} to {to} by airflow:bob",
                        result_data={"artefact": "clip:normal", "action": "rollback", "from_version": before,
                                     "to_version": to})

    roll(old, new, "manual__rollback-back")
    registry.finish("clip_rebuild", "clip_index_normal", "scheduled__unchanged-2", status="completed",
                    deployed_by="airflow-scheduler", message=f"normal index unchanged, version {old} stays live",
                    result_data={"index_type": "normal", "version": old, "unchanged": True})
    page = card()
    assert text_of(page, "live-since") == (f"Live since {link_time(index, 'normal')}, rolled back by "
                                           "deployment_rollback run manual__rollback-back (airflow:bob)")
    assert text_of(page, "built") == "Built 2026-11-02 02:00:05 UTC by clip_index_normal run manual__built-old"
    assert button_labels(page) == {new: "Roll forward"}

    roll(new, old, "manual__rollback-forward")
    assert text_of(card(), "live-since") == (f"Live since {link_time(index, 'normal')}, rolled forward by "
                                             "deployment_rollback run manual__rollback-forward (airflow:bob)")


def test_clip_index_built_with_a_random_checkpoint_gets_the_badge(client, tokens, roots, registry, tmp_path):
    index, _ = roots
    checkpoint = tmp_path / "weights" / "clip-random.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"not really weights")
    (tmp_path / "weights" / "clip-random.pt.json").write_text(json.dumps({"inspection_random_init": True}))
    publish_clip(index, "defect", NORMAL_VERSIONS[0], clip_manifest(NORMAL_VERSIONS[0], pretrained=str(checkpoint)))

    page = client.get("/deployments/", headers=bearer(tokens["alice"])).text
    assert "random weights (demo/test)" in card_html(page, "clip:defect")
    # Without a history row, the run still comes from the manifest.
    assert f"/dags/clip_index_defect/runs/manual__{NORMAL_VERSIONS[0]}" in card_html(page, "clip:defect")


def test_a_corrupt_artefact_shows_its_error_on_its_card_only(client, tokens, roots, registry):
    index, banks = roots
    publish_clip(index, "normal", NORMAL_VERSIONS[0], clip_manifest(NORMAL_VERSIONS[0]))
    publish_clip(index, "defect", NORMAL_VERSIONS[0], '{"count": 3,')  # cut short
    publish_bank(banks, "BRKT01", BANK_VERSIONS[0])
    publish_bank(banks, "GEAR02", BANK_VERSIONS[0])
    (banks.releases / "GEAR02" / ".pin.json").write_text("[1, 2")
    (banks.releases / "GEAR02" / BANK_VERSIONS[0] / "bank_config.json").write_text("[]")

    response = client.get("/deployments/", headers=bearer(tokens["alice"]))
    assert response.status_code == 200
    page = response.text
    assert "manifest.json is unreadable" in card_html(page, "clip:defect")
    assert "unreadable" not in card_html(page, "clip:normal") and "<dd>12</dd>" in card_html(page, "clip:normal")
    gear = card_html(page, "GEAR02")
    assert "bank_config.json holds a JSON list, not an object" in gear and "pin file" in gear
    assert "4096 × 1536" in card_html(page, "BRKT01")


# --------------------------------------------------------------------------- histogram
def test_histogram_route_serves_only_that_file_of_a_kept_version(client, tokens, published, tmp_path):
    _, banks = published
    url = f"/deployments/artefacts/patchcore/BRKT01/{BANK_VERSIONS[1]}/score_histogram.png"
    response = client.get(url, headers=bearer(tokens["alice"]))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == PNG
    assert client.get(url.replace(BANK_VERSIONS[1], BANK_VERSIONS[0]), headers=bearer(tokens["alice"])).content == PNG

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    # A histogram that is a link out of its version directory is not served.
    (banks.releases / "BRKT01" / BANK_VERSIONS[0] / "score_histogram.png").unlink()
    os.symlink(secret, banks.releases / "BRKT01" / BANK_VERSIONS[0] / "score_histogram.png")
    for bad in (f"BRKT01/{BANK_VERSIONS[0]}", "BRKT01/20261107T000000000000Z", "NOPE/" + BANK_VERSIONS[1],
                "BRKT01/..", "..%2F..%2Fsecret/x", "BRKT01/%2E%2E", "%2E%2E/BRKT01", "BRKT01/.pin.json"):
        response = client.get(f"/deployments/artefacts/patchcore/{bad}/score_histogram.png",
                              headers=bearer(tokens["alice"]))
        assert response.status_code == 404, bad
        assert b"not yours" not in response.content


# --------------------------------------------------------------------------- history
def test_history_is_newest_first_filterable_and_expandable(client, tokens, registry):
    registry.finish("clip_rebuild", "clip_index_normal", "manual__a", status="completed",
                    message="normal index version V1 published: 12 images",
                    result_data={"index_type": "normal", "version": "V1"})
    registry.finish("patchcore_create", "patchcore_memory_bank", "manual__b", status="failed",
                    message="1 of 2 products failed: GEAR02 at build: out of memory",
                    result_data={"products": {"BRKT01": {"status": "published", "version": "B1", "bank_size": 77,
                                                         "tau": {"image": 2.5, "pixel": 1.0}, "auroc": 0.91},
                                              "GEAR02": {"status": "failed", "stage": "build",
                                                         "error": "out of memory"}}})
    registry.finish("rollback", "deployment_rollback", "manual__c", status="completed",
                    message="clip:normal rolled back from V2 to V1 by airflow:alice",
                    result_data={"artefact": "clip:normal", "action": "rollback", "from_version": "V2",
                                 "to_version": "V1"}, deployed_by="airflow:alice")

    page = client.get("/deployments/history", headers=bearer(tokens["alice"])).text
    ids = [int(i) for i in re.findall(r'<details class="history-row[^"]*" id="deploy-(\d+)"', page)]
    assert len(ids) == 3 and ids == sorted(ids, reverse=True)
    first = page.index('id="deploy-')
    assert page.index("clip:normal: V2 → V1") > first  # the rollback row comes first
    assert page.index("clip:normal: V2 → V1") < page.index("GEAR02 at build") < page.index("normal index, version V1")
    assert "3 deployments" in page
    # Collapsed, each row says its outcome; times are UTC.
    assert [summary_outcome(row) for row in summaries(page)] == [
        "rolled back clip:normal: V2 → V1",
        "failed 1 of 2 products failed: GEAR02 at build: out of memory",
        "published normal index, version V1"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", started) for started in started_times(page))
    # Details: message, per-product results, result_data, and the Airflow run.
    assert "1 of 2 products failed: GEAR02 at build: out of memory" in page
    assert "<td>BRKT01</td><td>published</td><td>B1</td><td>77</td>" in page
    assert "<td>build: out of memory</td>" in page
    assert 'href="/dags/patchcore_memory_bank/runs/manual__b"' in page
    assert "&#34;to_version&#34;: &#34;V1&#34;" in page or '"to_version": "V1"' in page

    by_type = client.get("/deployments/history?deploy_type=patchcore_create", headers=bearer(tokens["alice"])).text
    assert "GEAR02 at build" in by_type and "V2 → V1" not in by_type and "1 deployment<" in by_type
    assert '<option value="patchcore_create" selected>' in by_type
    by_status = client.get("/deployments/history?status=completed", headers=bearer(tokens["alice"])).text
    assert "GEAR02 at build" not in by_status and "V2 → V1" in by_status and "version V1" in by_status
    both = client.get("/deployments/history?status=completed&deploy_type=rollback",
                      headers=bearer(tokens["alice"])).text
    assert "V2 → V1" in both and "version V1" not in both


def summaries(page: str) -> list[str]:
    """Each History row's collapsed line (its ``<summary>``), in page order."""
    return re.findall(r'<details class="history-row[^"]*" id="deploy-\d+">\s*<summary>(.*?)</summary>', page, re.S)


def summary_outcome(summary: str) -> str:
    """The "What happened" cell of a row's collapsed line, as text."""
    cell = re.search(r'<span class="what"[^>]*>(.*?)</span>', summary, re.S).group(1)
    return " ".join(re.sub(r"<[^>]+>", " ", cell).split())


def started_times(page: str) -> list[str]:
    return re.findall(r'<span class="started">([^<]*)</span>', page)


def test_history_rows_say_their_outcome_collapsed_and_link_a_waiting_approval(client, tokens, registry,
                                                                              airflow_api):
    """Unchanged, rejected and failed rows say so with their message; a run waiting for approval links to its
    task's Required Actions page in the Airflow UI (mapped or not), as Airflow's HITL API names the task."""
    registry.finish("clip_rebuild", "clip_index_normal", "scheduled__1", status="completed",
                    message="normal index unchanged, version V1 stays live: the same 12 images and model",
                    result_data={"index_type": "normal", "version": "V1", "unchanged": True})
    registry.finish("clip_rebuild", "clip_index_defect", "manual__2", status="failed",
                    message="defect index version V9 was not published: rejected by alice. The staged version "
                            "was discarded.",
                    result_data={"index_type": "defect", "version": None, "approval": {"status": "rejected"}})
    registry.finish("patchcore_create", "patchcore_memory_bank", "manual__3", status="failed",
                    message="the run failed before its register task (closed by the failure callback)")
    registry.start("clip_rebuild", "clip_index_normal", "manual__4", details={"index_type": "normal"})
    registry.start("patchcore_create", "patchcore_memory_bank", "manual__5")
    registry.start("rollback", "deployment_rollback", "manual__6", details={"artefact": "BRKT01"})
    airflow_api.hitl_details = [
        {"subject": "Publish normal index version V2?", "task_instance": {
            "dag_id": "clip_index_normal", "dag_run_id": "manual__4", "task_id": "approve", "map_index": -1}},
        {"subject": "Publish banks BRKT01?", "task_instance": {
            "dag_id": "patchcore_memory_bank", "dag_run_id": "manual__5", "task_id": "approve", "map_index": 2}}]

    page = client.get("/deployments/history", headers=bearer(tokens["alice"])).text
    assert [summary_outcome(row) for row in summaries(page)] == [
        "running BRKT01",
        "waiting for approval Approve or reject Publish banks BRKT01?",
        "waiting for approval Approve or reject Publish normal index version V2?",
        "failed the run failed before its register task (closed by the failure callback)",
        "rejected defect index version V9 was not published: rejected by alice. The staged version was discarded.",
        "unchanged normal index, version V1 stays live (nothing published)"]
    links = re.findall(r'<a class="required-actions" href="([^"]+)"', page)
    assert links == ["/dags/patchcore_memory_bank/runs/manual__5/tasks/approve/mapped/2/required_actions",
                     "/dags/clip_index_normal/runs/manual__4/tasks/approve/required_actions"]
    assert ("GET", "/api/v2/dags/~/dagRuns/~/hitlDetails?response_received=false&limit=100") in airflow_api.calls
    assert len(started_times(page)) == 6 and all(t.endswith(" UTC") for t in started_times(page))

    # Without open rows Airflow is not asked.
    airflow_api.calls.clear()
    client.get("/deployments/history?status=failed", headers=bearer(tokens["alice"]))
    assert airflow_api.calls == []


def test_history_is_paged(client, tokens, registry, console_database):
    import MySQLdb

    conn = MySQLdb.connect(**console_database, autocommit=True)
    conn.cursor().executemany(
        "INSERT INTO deployment_logs (deploy_type, status, result_message, result_data) VALUES (%s, %s, %s, %s)",
        [("clip_rebuild", "completed", f"row {n}", json.dumps({"index_type": "normal", "version": f"v{n:03d}"}))
         for n in range(120)])
    conn.close()
    first = client.get("/deployments/history", headers=bearer(tokens["alice"])).text
    assert first.count('<details class="history-row') == 50 and "page 1 of 3" in first
    assert "version v119" in first and "version v070" in first and "version v069" not in first
    assert 'href="?page=2" rel="next"' in first and 'rel="prev"' not in first
    last = client.get("/deployments/history?page=3", headers=bearer(tokens["alice"])).text
    assert last.count('<details class="history-row') == 20 and "version v000" in last and 'rel="next"' not in last
    filtered = client.get("/deployments/history?status=completed&page=2", headers=bearer(tokens["alice"])).text
    assert 'href="?status=completed&amp;page=3"' in filtered


# --------------------------------------------------------------------------- authentication, permissions
@pytest.mark.parametrize("method, path", [
    ("GET", "/deployments/"), ("GET", "/deployments/history"), ("GET", "/deployments/static/console.css"),
    ("GET", f"/deployments/artefacts/patchcore/BRKT01/{BANK_VERSIONS[1]}/score_histogram.png"),
    ("POST", "/deployments/rollback"),
])
def test_anonymous_requests_are_refused(client, published, method, path):
    assert client.request(method, path).status_code == 401
    assert client.request(method, path, headers=bearer("not-a-jwt")).status_code == 403
    # A browser is sent to Airflow's sign-in page, and back here afterwards.
    browser = client.request(method, path, headers={"Accept": "text/html"}, follow_redirects=False)
    assert browser.status_code == 303
    assert browser.headers["location"].startswith("/auth/login?next=http%3A%2F%2Ftestserver%2Fdeployments%2F")


def test_the_ui_cookie_works_like_a_bearer_token(client, tokens, published):
    client.cookies.set("_token", tokens["alice"])
    try:
        response = client.get("/deployments/")
    finally:
        client.cookies.clear()
    assert response.status_code == 200 and "Signed in as alice" in response.text


def test_users_without_permission_are_refused_and_viewers_get_no_rollback(client, tokens, published, airflow_api):
    for path in ("/deployments/", "/deployments/history",
                 f"/deployments/artefacts/patchcore/BRKT01/{BANK_VERSIONS[1]}/score_histogram.png"):
        assert client.get(path, headers=bearer(tokens["nobody"])).status_code == 403, path
    page = client.get("/deployments/", headers=bearer(tokens["victor"]))
    assert page.status_code == 200
    assert "Roll back</button>" not in page.text and "Unpin" not in page.text
    assert "You may not trigger" in page.text
    refused = client.post("/deployments/rollback", headers=bearer(tokens["victor"]),
                          data={"artefact": "clip:normal", "version": NORMAL_VERSIONS[0], "csrf_token": "-"})
    assert refused.status_code == 403 and refused.json() == {"detail": "You may not trigger deployment_rollback."}
    assert airflow_api.requests == []


# --------------------------------------------------------------------------- rollback
def test_rollback_is_forwarded_to_airflows_rest_api_with_the_users_token(client, tokens, published, airflow_api):
    client.cookies.set("_token", tokens["alice"])  # as the UI's frame sends it
    try:
        page = client.get("/deployments/").text
        response = client.post("/deployments/rollback", headers={"Origin": "http://testserver"}, data={
            "artefact": "clip:normal", "version": NORMAL_VERSIONS[0], "action": "rollback",
            "csrf_token": csrf_from(page)})
    finally:
        client.cookies.clear()
    assert response.status_code == 200, response.text
    assert airflow_api.requests == [{
        "path": "/api/v2/dags/deployment_rollback/dagRuns",
        "authorization": f"Bearer {tokens['alice']}",
        "json": {"logical_date": None, "conf": {"artefact": "clip:normal", "version": NORMAL_VERSIONS[0]},
                 "note": "Requested in the Deployments console by alice"},
    }]
    run_id = airflow_api.reply[1]["dag_run_id"]
    assert f'href="/dags/deployment_rollback/runs/{quote(run_id, safe="")}"' in response.text
    # Nothing changed on disk: only the DAG run rolls back.
    assert published[0].current("normal") == NORMAL_VERSIONS[1]


def test_unpin_and_bank_rollback_are_forwarded_with_a_bearer_token(client, tokens, published, airflow_api):
    page = client.get("/deployments/", headers=bearer(tokens["alice"])).text
    token = csrf_from(page)
    unpinned = client.post("/deployments/rollback", headers=bearer(tokens["alice"]), data={
        "artefact": "clip:normal", "action": "unpin", "csrf_token": token})
    assert unpinned.status_code == 200 and "Unpin of clip:normal requested" in unpinned.text
    assert "The live version does not change" in unpinned.text
    assert "scheduled runs\n     may publish a new version of clip:normal again" in unpinned.text
    assert client.post("/deployments/rollback", headers=bearer(tokens["alice"]), data={
        "artefact": "BRKT01", "version": BANK_VERSIONS[0], "csrf_token": token}).status_code == 200
    assert [r["json"]["conf"] for r in airflow_api.requests] == [
        {"artefact": "clip:normal", "unpin": True}, {"artefact": "BRKT01", "version": BANK_VERSIONS[0]}]
    assert {r["authorization"] for r in airflow_api.requests} == {f"Bearer {tokens['alice']}"}


def test_airflows_refusal_is_shown(client, tokens, published, airflow_api):
    airflow_api.reply = (409, {"detail": "DAG deployment_rollback already has the maximum of 1 active run"})
    page = client.get("/deployments/", headers=bearer(tokens["alice"])).text
    response = client.post("/deployments/rollback", headers=bearer(tokens["alice"]), data={
        "artefact": "clip:normal", "version": NORMAL_VERSIONS[2], "csrf_token": csrf_from(page)})
    assert response.status_code == 409
    assert "was not started" in response.text
    assert "Airflow refused (409): DAG deployment_rollback already has the maximum of 1 active run" in response.text


def test_forged_or_pointless_rollbacks_never_reach_airflow(client, tokens, published, airflow_api):
    page = client.get("/deployments/", headers=bearer(tokens["alice"])).text
    good = csrf_from(page)
    form = {"artefact": "clip:normal", "version": NORMAL_VERSIONS[0]}
    # Without its form token: one sentence saying what to do, not FastAPI's validation errors.
    incomplete = client.post("/deployments/rollback", headers=bearer(tokens["alice"]), data=form)
    assert incomplete.status_code == 422 and incomplete.json() == {"detail": (
        "The form is incomplete or has expired (missing: csrf_token): reload the Deployments page and try again.")}
    page_422 = client.post("/deployments/rollback", headers={**bearer(tokens["alice"]), "Accept": "text/html"},
                           data=form)
    assert page_422.status_code == 422 and "<h2>The form is incomplete or has expired" in page_422.text
    assert "Reload the Deployments page" in page_422.text and "administrator" not in page_422.text
    assert client.post("/deployments/rollback", headers=bearer(tokens["alice"]),
                       data={**form, "csrf_token": "forged"}).status_code == 403
    cross_site = client.post("/deployments/rollback", data={**form, "csrf_token": good},
                             headers={**bearer(tokens["alice"]), "Origin": "http://evil.example",
                                      "Accept": "text/html"})
    assert cross_site.status_code == 403
    assert "This request came from another site (http://evil.example), not from the Deployments page" in cross_site.text
    assert "open Browse → Deployments in Airflow itself" in cross_site.text and "administrator" not in cross_site.text
    # Another user's form token does not work either.
    bobs = csrf_from(client.get("/deployments/", headers=bearer(tokens["bob"])).text)
    assert client.post("/deployments/rollback", headers=bearer(tokens["alice"]),
                       data={**form, "csrf_token": bobs}).status_code == 403
    # The live version, a version that is not kept, an unknown artefact: said at once, not forwarded.
    for artefact, version, expected in (("clip:normal", NORMAL_VERSIONS[1], "already live"),
                                        ("clip:normal", "20250101T000000000000Z", "is not kept"),
                                        ("clip:other", NORMAL_VERSIONS[0], "not a published artefact"),
                                        ("../etc", NORMAL_VERSIONS[0], "not a published artefact")):
        response = client.post("/deployments/rollback", headers=bearer(tokens["alice"]),
                               data={"artefact": artefact, "version": version, "csrf_token": good})
        assert response.status_code == 400 and expected in response.text, artefact
    assert airflow_api.requests == []


def test_a_paused_rollback_dag_is_not_triggered_and_the_page_says_what_to_do(client, tokens, published, airflow_api):
    """Someone paused deployment_rollback: a run would sit queued, so nothing is triggered and nothing is said to
    be "requested"; the page links the DAG's toggle and offers "Unpause and roll back", which does both."""
    airflow_api.paused = True
    page = client.get("/deployments/", headers=bearer(tokens["alice"])).text
    form = {"artefact": "clip:normal", "version": NORMAL_VERSIONS[0], "action": "rollback",
            "csrf_token": csrf_from(page)}
    response = client.post("/deployments/rollback", headers=bearer(tokens["alice"]), data=form)
    assert response.status_code == 409
    assert (f"Rollback of clip:normal to {NORMAL_VERSIONS[0]} was not started: <code>deployment_rollback</code> "
            "is paused") in response.text
    assert "Nothing was triggered" in response.text and "requested" not in response.text
    assert 'href="/dags/deployment_rollback"' in response.text and "switch its\n     toggle on" in response.text
    assert ">Unpause and roll back</button>" in response.text
    assert airflow_api.requests == [] and ("GET", "/api/v2/dags/deployment_rollback") in airflow_api.calls

    unpaused = client.post("/deployments/rollback", headers=bearer(tokens["alice"]),
                           data={**form, "unpause": "1", "csrf_token": csrf_from(response.text)})
    assert unpaused.status_code == 200, unpaused.text
    assert f"Rollback of clip:normal to {NORMAL_VERSIONS[0]} requested" in unpaused.text
    assert "(after unpausing <code>deployment_rollback</code>)" in unpaused.text
    assert airflow_api.calls[-1] == ("PATCH", "/api/v2/dags/deployment_rollback?update_mask=is_paused")
    assert [r["json"]["conf"] for r in airflow_api.requests] == [{"artefact": "clip:normal",
                                                                   "version": NORMAL_VERSIONS[0]}]
    # Rolling forward says so.
    airflow_api.paused = True
    forward = client.post("/deployments/rollback", headers=bearer(tokens["alice"]),
                          data={**form, "version": NORMAL_VERSIONS[2]})
    assert forward.status_code == 409 and ">Unpause and roll forward</button>" in forward.text
    assert f"Roll forward of clip:normal to {NORMAL_VERSIONS[2]} was not started" in forward.text


# --------------------------------------------------------------------------- the plugin
def test_airflow_loads_the_plugin_with_its_app_and_navigation_entry(client):
    from airflow import plugins_manager

    apps, _ = plugins_manager.get_fastapi_plugins()
    assert [a["url_prefix"] for a in apps if a["name"] == "Deployments"] == ["/deployments"]
    views, _ = plugins_manager._get_ui_plugins()
    view = next(v for v in views if v["name"] == "Deployments")
    assert view["url_route"] == "deployments" and view["href"] == "/deployments/" and view["destination"] == "nav"
    assert Path(__file__).resolve().parents[2].joinpath("plugins", "deployments_console.py").is_file()


def test_reloading_a_rollback_result_goes_back_to_live_now_without_triggering(client, tokens, published, airflow_api):
    response = client.get("/deployments/rollback", headers=bearer(tokens["alice"]), follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/deployments/"
    assert client.get("/deployments/rollback").status_code == 401  # still signed-in users only
    assert airflow_api.requests == []  # nothing was triggered
