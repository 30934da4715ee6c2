"""The Deployments console on the documented Celery layout: an API server with EMPTY local roots, the
workers publishing with ``INSPECTION_PUBLISH_TARGETS=channel`` into the release channel on the real S3
server. The cards, the kept versions, the pin and the histogram come from the channel; Roll back is
accepted and the rollback task (on a worker) makes the version live; with the channel unreachable (a
closed port, a rejected key) the page still answers 200 with "release channel unreachable" on the
cards, and History renders.

Real parts as in test_console_app (whose fixtures and helpers this module uses): MariaDB, real JWTs,
Airflow's ``init_plugins``; only Airflow's REST API is stood in for.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from inspection_refresh import compose
from inspection_refresh.config import get_settings
from inspection_refresh.runtime import PermanentError

from tests.conftest import _free_port, storage_connection
from tests.integration.test_console_app import (  # noqa: F401 (fixtures)
    BANK_VERSIONS, NORMAL_VERSIONS, PNG, airflow_api, auth_manager, bearer, card_html, client, clip_manifest,
    console_database, csrf_from, publish_the_deployments, registry, rollback_buttons, text_of, tokens,
)

PREFIX = "deployments/"
FINGERPRINT = "f" * 64


def use_roots(monkeypatch, base: Path) -> None:
    """This process plays the host whose roots are under ``base`` (a worker, or the API server)."""
    monkeypatch.setenv("INSPECTION_INDEX_ROOT", str(base / "clip_index"))
    monkeypatch.setenv("INSPECTION_PATCHCORE_ROOT", str(base / "patchCore"))


@pytest.fixture
def celery_layout(storage, s3_server, tmp_path, monkeypatch, registry):
    """A worker published to the channel (CLIP normal: three versions, rolled back and pinned to the middle
    one; bank BRKT01: two versions); this process is then the API server, whose roots are empty."""
    monkeypatch.setenv("INSPECTION_PUBLISH_TARGETS", "channel")
    monkeypatch.setenv("INSPECTION_CHANNEL_BUCKET", storage.bucket)
    monkeypatch.setenv("INSPECTION_CHANNEL_PREFIX", PREFIX)
    monkeypatch.delenv("INSPECTION_CHANNEL_CONN_ID", raising=False)
    monkeypatch.delenv("INSPECTION_INDEX_RELEASES", raising=False)
    monkeypatch.delenv("INSPECTION_PATCHCORE_RELEASES", raising=False)
    # An earlier dag.test() in this process leaves AIRFLOW_CTX_* set, which the channel records as the
    # publishing run: these publishes are this fixture's own, named by its rows only.
    for variable in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    use_roots(monkeypatch, tmp_path / "worker")
    worker = get_settings()
    index, banks = compose.index_publisher(worker), compose.patchcore_publisher(worker)
    publish_the_deployments(index, banks, registry,
                            lambda version: {**clip_manifest(version), "source_fingerprint": FINGERPRINT})
    api_server = tmp_path / "api-server"
    use_roots(monkeypatch, api_server)
    return {"worker": worker, "api_server": api_server, "storage": storage}


def pointer_time(channel, name: str) -> str:
    """When the channel's ``current.json`` of ``name`` moved, as the page writes times."""
    from datetime import datetime, timezone

    moved = datetime.fromisoformat(channel.pointer(name)["published_at"]).astimezone(timezone.utc)
    return moved.strftime("%Y-%m-%d %H:%M:%S UTC")


def assert_nothing_on_disk(api_server: Path) -> None:
    """The console reads the channel; it never fills the API server's roots."""
    assert not api_server.exists() or not any(p.is_file() for p in api_server.rglob("*"))


def test_a_console_without_local_roots_shows_the_channels_cards_and_rolls_back(
        client, tokens, celery_layout, airflow_api, registry):
    from inspection_refresh.tasks.rollback import RollbackRun, register, resolve_artefact, roll_back

    # A later scheduled run found BRKT01 unchanged: it names the live version, but did not make it live.
    registry.finish("patchcore_create", "patchcore_memory_bank", "scheduled__2026-11-07T10:00:00+00:00",
                    status="completed", message=f"BRKT01 unchanged, version {BANK_VERSIONS[1]} stays live",
                    deployed_by="airflow-scheduler",
                    result_data={"products": {"BRKT01": {"status": "unchanged", "version": BANK_VERSIONS[1]}}})
    indexes, banks = compose.index_publisher().channel, compose.patchcore_publisher().channel
    page = client.get("/deployments/", headers=bearer(tokens["alice"]))
    assert page.status_code == 200, page.text
    normal = card_html(page.text, "clip:normal")
    assert f"live {NORMAL_VERSIONS[1]}" in normal and ">pinned<" in normal
    assert "by airflow:alice" in normal and "manual__rollback-1" in normal and "Unpin" in normal
    assert rollback_buttons(normal) == [NORMAL_VERSIONS[2], NORMAL_VERSIONS[0]]
    assert "<dd>12</dd>" in normal and "<dd>512</dd>" in normal and "ViT-B-32/openai|open_clip-3.3.0|prep-v1" in normal
    assert "(airflow:alice)" in normal and "Nothing published" not in normal
    assert "Nothing published yet." in card_html(page.text, "clip:defect")
    bank = card_html(page.text, "BRKT01")
    assert f"live {BANK_VERSIONS[1]}" in bank and "pinned" not in bank and "random weights (demo/test)" in bank
    assert "4096 × 1536" in bank and "2.2500 / 1.5000" in bank and "0.938" in bank and "0.875" in bank
    assert "(airflow-scheduler)" in bank and rollback_buttons(bank) == [BANK_VERSIONS[0]]
    # Who made each live and when: the channel's current.json (moved by the rollback that pinned normal).
    assert text_of(normal, "live-since") == (f"Live since {pointer_time(indexes, 'normal')}, rolled back by "
                                             "deployment_rollback run manual__rollback-1 (airflow:alice)")
    assert text_of(bank, "live-since") == (f"Live since {pointer_time(banks, 'BRKT01')}, published by "
                                           "patchcore_memory_bank run scheduled__2026-11-06T10:00:00+00:00 "
                                           "(airflow-scheduler)")
    histogram = f"/deployments/artefacts/patchcore/BRKT01/{BANK_VERSIONS[1]}/score_histogram.png"
    assert f'src="{histogram}"' in bank
    response = client.get(histogram, headers=bearer(tokens["alice"]))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png" and response.content == PNG
    for bad in ("BRKT01/20261107T000000000000Z", "NOPE/" + BANK_VERSIONS[1], "BRKT01/%2E%2E", "BRKT01/.pin.json"):
        assert client.get(f"/deployments/artefacts/patchcore/{bad}/score_histogram.png",
                          headers=bearer(tokens["alice"])).status_code == 404, bad
    assert_nothing_on_disk(celery_layout["api_server"])

    # Roll back from the console: accepted (the channel keeps the version), forwarded to Airflow's REST API.
    token = csrf_from(page.text)
    for version, expected in ((BANK_VERSIONS[1], "already live"), ("20250101T000000000000Z", "is not kept")):
        refused = client.post("/deployments/rollback", headers=bearer(tokens["alice"]),
                              data={"artefact": "BRKT01", "version": version, "csrf_token": token})
        assert refused.status_code == 400 and expected in refused.text
    response = client.post("/deployments/rollback", headers=bearer(tokens["alice"]),
                           data={"artefact": "BRKT01", "version": BANK_VERSIONS[0], "csrf_token": token})
    assert response.status_code == 200, response.text
    assert [r["json"]["conf"] for r in airflow_api.requests] == [{"artefact": "BRKT01", "version": BANK_VERSIONS[0]}]

    # The rollback task on this host knows the artefact from the channel alone ...
    api_settings = get_settings()
    assert resolve_artefact("BRKT01", api_settings).live_version() == BANK_VERSIONS[1]
    with pytest.raises(PermanentError, match=rf"s3://{celery_layout['storage'].bucket}/{PREFIX}patchcore/.*BRKT01"):
        resolve_artefact("NOPE", api_settings)
    # ... and the DAG run the console triggered runs on a worker: the version goes live everywhere.
    conf = airflow_api.requests[0]["json"]["conf"]
    run = RollbackRun(run_id=airflow_api.reply[1]["dag_run_id"], artefact=conf["artefact"], version=conf["version"],
                      deployed_by="alice", settings=celery_layout["worker"])
    facts = roll_back(run)
    assert (facts["from_version"], facts["to_version"]) == (BANK_VERSIONS[1], BANK_VERSIONS[0])
    assert register(run)["status"] == "completed"
    channel = compose.patchcore_publisher(api_settings).channel
    assert channel.pointer("BRKT01")["version"] == BANK_VERSIONS[0]

    bank = card_html(client.get("/deployments/", headers=bearer(tokens["alice"])).text, "BRKT01")
    assert f"live {BANK_VERSIONS[0]}" in bank and ">pinned<" in bank and "by alice" in bank
    assert text_of(bank, "live-since") == (f"Live since {pointer_time(channel, 'BRKT01')}, rolled back by "
                                           f"deployment_rollback run {run.run_id} (alice)")
    assert rollback_buttons(bank) == [BANK_VERSIONS[1]]
    assert_nothing_on_disk(celery_layout["api_server"])


def test_the_unchanged_check_compares_with_the_channels_live_version(celery_layout, monkeypatch):
    """A worker whose root is empty (or stale) still sees the channel's live index as the one to compare with."""
    from inspection_refresh.clip.weights import model_identity
    from inspection_refresh.tasks.clip_index import ClipRun, published_manifest, unchanged_live_index

    channel = compose.index_publisher().channel
    run = ClipRun(index_type="normal", run_id="scheduled__check", prefix="images/normal/")
    assert run.live_version() == NORMAL_VERSIONS[1]
    assert published_manifest(run)["version"] == NORMAL_VERSIONS[1]
    manifest = {**clip_manifest(NORMAL_VERSIONS[1]), "source_fingerprint": FINGERPRINT,
                "model_identity": model_identity("ViT-B-32", "openai")}
    channel._write_json(channel.version_prefix("normal", NORMAL_VERSIONS[1]) + "manifest.json", manifest)
    run = ClipRun(index_type="normal", run_id="scheduled__check", prefix="images/normal/")
    assert unchanged_live_index(run, FINGERPRINT)["version"] == NORMAL_VERSIONS[1]
    assert unchanged_live_index(run, "0" * 64) is None
    assert_nothing_on_disk(celery_layout["api_server"])


def test_a_worker_without_the_channels_live_bank_builds_instead_of_trusting_its_own_root(celery_layout, caplog):
    from inspection_refresh.tasks.patchcore.prepare import _unchanged_live_bank
    from inspection_refresh.tasks.patchcore.run import PatchcoreRun

    mirror = celery_layout["api_server"].parent / "mirror" / "ok"
    mirror.mkdir(parents=True)
    with caplog.at_level("INFO"):
        assert _unchanged_live_bank(PatchcoreRun(run_id="scheduled__check"), "BRKT01", mirror) is None
    assert f"the live bank {BANK_VERSIONS[1]} (the release channel's) is not kept on this worker" in caplog.text


@pytest.mark.parametrize("failure", ["closed port", "rejected key"])
def test_an_unreachable_channel_leaves_the_page_up_with_a_banner(client, tokens, celery_layout, airflow_api,
                                                                 monkeypatch, s3_server, failure):
    if failure == "closed port":
        connection = storage_connection(f"http://127.0.0.1:{_free_port()}")
    else:  # an expired or revoked access key
        connection = storage_connection(s3_server.endpoint, access_key="expired-key")
    token = csrf_from(client.get("/deployments/", headers=bearer(tokens["alice"])).text)  # while reachable
    monkeypatch.setenv("AIRFLOW_CONN_BROKEN_CHANNEL", connection)
    monkeypatch.setenv("INSPECTION_CHANNEL_CONN_ID", "broken_channel")

    started = time.monotonic()
    page = client.get("/deployments/", headers=bearer(tokens["alice"]))
    took = time.monotonic() - started
    assert page.status_code == 200, page.text
    for label in ("clip:normal", "clip:defect"):
        assert "release channel unreachable: " in card_html(page.text, label)
    assert "PatchCore banks: release channel unreachable: " in page.text
    assert "rejected the credentials" in page.text if failure == "rejected key" else "cannot reach" in page.text
    assert took < 60, f"the page took {took:.0f}s"  # one failed read per kind, not one per card

    history = client.get("/deployments/history", headers=bearer(tokens["alice"]))
    assert history.status_code == 200
    assert "normal index published" in history.text and "1 PatchCore bank published" in history.text

    response = client.post("/deployments/rollback", headers=bearer(tokens["alice"]), data={
        "artefact": "clip:normal", "version": NORMAL_VERSIONS[0], "csrf_token": token})
    assert response.status_code == 502 and "release channel unreachable: " in response.text
    histogram = client.get(f"/deployments/artefacts/patchcore/BRKT01/{BANK_VERSIONS[1]}/score_histogram.png",
                           headers=bearer(tokens["alice"]))
    assert histogram.status_code == 502
    assert airflow_api.requests == []
    # Reachable again: the same page is whole.
    monkeypatch.delenv("INSPECTION_CHANNEL_CONN_ID")
    assert "unreachable" not in client.get("/deployments/", headers=bearer(tokens["alice"])).text
