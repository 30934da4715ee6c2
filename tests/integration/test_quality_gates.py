"""The quality gate end to end through ``dag.test()``: bad data is flagged, reported, asked about or blocked.

Real parts as in the other DAG tests: the NCP-like S3 server, MariaDB (products + deployment_logs), a migrated
Airflow DB, the PatchCore builder (random-init backbone) and open_clip/FAISS (random-init CLIP weights). The
planted defects are the project's sample generator's defect images, uploaded into a product's normal folder;
the gallery's problems are real files: a byte-identical copy, a copy of a defect-gallery image, a re-encode.
"""

from __future__ import annotations

import io
import json

import pytest
from inspection_refresh.dev.samples import DEFECT_TYPES

from tests.integration.dag_runner import clip_dag_env, patchcore_dag_env, run_dag
from tests.integration.test_approval import Approver, airflow_api  # noqa: F401 (a fixture)
from tests.integration.test_clip_dag import deployment_row, jpeg, live_version, seed_normal
from tests.integration.test_console_app import (  # noqa: F401 (fixtures)
    BANK_VERSIONS, NORMAL_VERSIONS, auth_manager, bearer, card_html, client, clip_manifest, console_database,
    publish_bank, publish_clip, registry, roots, tokens,
)
from tests.integration.test_notifications import Inbox, email_on, inbox  # noqa: F401 (fixtures)
from tests.samples import sample_jpeg

pytestmark = pytest.mark.slow

SIZE, SHORTER = (320, 256), 192
"""Big enough for the sample generator's defects to survive the resize, small enough for a quick random-init build."""
PLANTED = ("WOV21_OK_004a.jpg", "WOV21_OK_011a.jpg", "WOV21_OK_016a.jpg")
"""Defect images (the sample generator's) uploaded into WOV21's normal folder under normal-looking names; they
sort into the calibration-bank images (a defect among the held-out images would raise tau itself)."""


# ------------------------------------------------------------------------------------------ PatchCore


@pytest.fixture
def patchcore(s3_server, mysql_database, airflow_db, sql, tmp_path, monkeypatch):
    """WOV21 (product 21, the generator's woven texture) with 18 clean normal images, the only active product."""
    with patchcore_dag_env("gate", "(21, 'WOV21', 'Woven panel', 1)", sql, tmp_path, monkeypatch) as env:
        for seq in range(18):
            env["put"](f"images/normal/21/WOV21_OK_{seq:03d}.jpg", sample_jpeg(1, seq, size=SIZE))
        yield env


def plant_defects(env) -> None:
    for number, name in enumerate(PLANTED):
        env["put"](f"images/normal/21/{name}", sample_jpeg(1, 700 + number, DEFECT_TYPES[number % 3], size=SIZE))


def run_row(env, run_id: str) -> dict:
    return deployment_row(env["sql"], run_id)


def test_planted_defects_are_flagged_ranked_first_and_block_publishes_nothing(patchcore, email_on):  # noqa: F811
    from inspection_refresh.publish import Publisher

    params = {"products": ["WOV21"], "shorter": SHORTER}
    clean = run_dag("patchcore_memory_bank", {**params, "quality_gate": "off"})
    assert clean.state == "success", clean.task_states
    publisher = Publisher(patchcore["root"])
    live = publisher.current("WOV21")
    live_bank = (patchcore["root"] / "WOV21" / "memory_bank.pt").read_bytes()

    plant_defects(patchcore)
    blocked = run_dag("patchcore_memory_bank", {**params, "quality_gate": "block"})

    assert blocked.state == "failed"
    assert blocked.task_states["product.build[0]"] == "success"
    assert blocked.task_states["product.publish[0]"] == "skipped"
    assert publisher.current("WOV21") == live and publisher.versions("WOV21") == [live]  # the live bank stays
    assert (patchcore["root"] / "WOV21" / "memory_bank.pt").read_bytes() == live_bank
    row = run_row(patchcore, blocked.run_id)
    tex = row["result_data"]["products"]["WOV21"]
    assert row["status"] == "failed" and tex["status"] == "failed" and tex["stage"] == "quality_gate"
    suspects = [s["file"] for s in tex["suspected_defects"]]
    assert set(PLANTED) <= set(suspects)
    assert set(suspects[:len(PLANTED)]) == set(PLANTED), f"planted defects not ranked first: {suspects}"
    assert tex["num_suspected_defects"] == len(suspects)
    message = row["result_message"]
    assert "WOV21 at quality_gate: blocked by the quality gate:" in message
    assert "score 1.05x tau or more out of sample" in message and all(name in message for name in PLANTED)
    assert "Nothing was published" in message
    gate = row["result_data"]["quality_gate"]
    assert gate["mode"] == "block" and gate["action"] == "block" and list(gate["blocked"]) == ["WOV21"]
    assert {f["check"] for f in gate["findings"]} >= {"suspected_defects"}
    assert row["result_data"]["approval"]["status"] == "blocked"
    [mail] = email_on.messages  # the blocked run's one notification (the clean run sent none)
    assert mail["Subject"] == f"Deployment run failed: patchcore_memory_bank {blocked.run_id}"
    assert row["result_message"] in Inbox.text(mail)


# ------------------------------------------------------------------------------------------ CLIP

DEFECT_KEY = "images/defect/1_1/BRKT01_D1_001.jpg"
DUPLICATE = "images/normal/1/BRKT01_OK_100.jpg"
"""A byte-identical copy of BRKT01_OK_000."""
CROSS_GALLERY = "images/normal/1/BRKT01_OK_101.jpg"
"""A copy of the defect gallery's DEFECT_KEY, uploaded as a normal image."""
NEAR_DUPLICATE = "images/normal/1/BRKT01_OK_102.jpg"
"""BRKT01_OK_001 re-encoded at another JPEG quality."""


@pytest.fixture
def clip(s3_server, mysql_database, airflow_db, clip_checkpoint, sql, tmp_path, monkeypatch):
    """A fresh bucket, index root and cache; products 1 and 2 in the products table. The embedding checks are
    forced on: with the random test weights ``auto`` skips them (every pair would look alike)."""
    monkeypatch.setenv("INSPECTION_QUALITY_SIMILARITY_CHECKS", "on")
    return clip_dag_env("gatec", clip_checkpoint, sql, tmp_path, monkeypatch)


def reencoded(data: bytes, quality: int = 70) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def seed_problem_gallery(clip) -> None:
    """A live defect index (its manifest names its images' sha256), then a normal gallery of 8 clean images
    plus a duplicate, a cross-gallery copy and a near-duplicate."""
    clip["put"](DEFECT_KEY, jpeg(0, 700, "scratch"))
    clip["put"]("images/defect/2_2/FABR02_D2_001.jpg", jpeg(1, 701, "hole"))
    defect = run_dag("clip_index_defect")
    assert defect.state == "success", defect.task_states
    seed_normal(clip["put"])
    clip["put"](DUPLICATE, jpeg(0, 0))  # seed_normal's BRKT01_OK_000: the same bytes
    clip["put"](CROSS_GALLERY, jpeg(0, 700, "scratch"))
    clip["put"](NEAR_DUPLICATE, reencoded(jpeg(0, 1)))


def console_card(index_type: str):
    """The Deployments page's card of the live ``index_type`` index."""
    from inspection_refresh import compose
    from inspection_refresh.config import get_settings
    from inspection_refresh.console.data import artefact_card
    from inspection_refresh.live import Releases

    return artefact_card("clip", index_type, Releases(compose.index_publisher(get_settings())))


def assert_reports_each_problem(hygiene: dict) -> None:
    lists = hygiene["lists"]
    assert ["images/normal/1/BRKT01_OK_000.jpg", DUPLICATE] in lists["exact_duplicates"], lists
    assert [CROSS_GALLERY, DEFECT_KEY] in lists["in_both_galleries"], lists
    near = {frozenset(pair[:2]) for pair in lists["near_duplicates"]}
    assert frozenset({"images/normal/1/BRKT01_OK_001.jpg", NEAR_DUPLICATE}) in near, lists
    assert hygiene["counts"]["exact_duplicates"] >= 1 and hygiene["counts"]["in_both_galleries"] == 1


def test_warn_publishes_and_reports_each_gallery_problem_block_publishes_nothing(clip, email_on):  # noqa: F811
    seed_problem_gallery(clip)
    warned = run_dag("clip_index_normal")  # a manual run's default: warn
    assert warned.state == "success", warned.task_states
    live = live_version(clip["root"], "normal")
    row = deployment_row(clip["sql"], warned.run_id)
    assert row["status"] == "completed" and row["result_data"]["version"] == live
    assert_reports_each_problem(row["result_data"]["quality"])
    gate = row["result_data"]["quality_gate"]
    assert (gate["mode"], gate["action"]) == ("warn", "publish")
    assert {"exact_duplicates", "in_both_galleries", "near_duplicates"} <= {f["check"] for f in gate["findings"]}
    assert "Quality gate (warn) flagged: normal: " in row["result_message"]
    assert DUPLICATE in row["result_message"] and CROSS_GALLERY in row["result_message"]
    manifest = json.loads((clip["root"] / "normal" / "manifest.json").read_text())
    assert_reports_each_problem(manifest["quality"])  # what the console shows for the live version
    assert manifest["image_sha256"][DUPLICATE] == manifest["image_sha256"]["images/normal/1/BRKT01_OK_000.jpg"]
    flagged = {finding.check: finding for finding in console_card("normal").flagged}
    assert DUPLICATE in flagged["exact_duplicates"].files and CROSS_GALLERY in flagged["in_both_galleries"].files
    assert "cosine" in flagged["near_duplicates"].message
    [told] = [m for m in email_on.messages if m["Subject"] == (
        f"Publishing flagged data (quality gate warn): clip_index_normal {warned.run_id}")]
    assert DUPLICATE in Inbox.text(told) and CROSS_GALLERY in Inbox.text(told)

    clip["put"]("images/normal/2/FABR02_OK_900.jpg", jpeg(1, 900))
    blocked = run_dag("clip_index_normal", {"quality_gate": "block"})
    assert blocked.state == "failed"
    assert blocked.task_states["approve"] == "success" and blocked.task_states["publish"] == "skipped"
    assert live_version(clip["root"], "normal") == live  # the live index stays
    row = deployment_row(clip["sql"], blocked.run_id)
    assert row["status"] == "failed" and row["result_data"]["approval"]["status"] == "blocked"
    assert "was not published: blocked by the quality gate: " in row["result_message"]
    assert DUPLICATE in row["result_message"] and "The live index is unchanged (version " + live in row[
        "result_message"]
    assert row["result_data"]["quality_gate"]["blocked"]["normal"].startswith("blocked by the quality gate")
    [failed] = [m for m in email_on.messages if m["Subject"] == (
        f"Deployment run failed: clip_index_normal {blocked.run_id}")]
    assert row["result_message"] in Inbox.text(failed)


def test_approve_asks_even_without_require_approval_and_the_request_lists_what_was_flagged(clip, airflow_api):  # noqa: F811
    seed_problem_gallery(clip)
    with Approver(airflow_api, "clip_index_normal", "alice", "Reject") as approver:
        result = run_dag("clip_index_normal", {"quality_gate": "approve"})  # require_approval stays off
    approver.check()
    assert approver.request["subject"].startswith("Publish normal index version")
    body = approver.request["body"]
    assert body.startswith("**Quality gate — ") and "approval required (approve)" in body
    assert DUPLICATE in body and CROSS_GALLERY in body and DEFECT_KEY in body and NEAR_DUPLICATE in body
    assert result.state == "failed" and live_version(clip["root"], "normal") is None
    row = deployment_row(clip["sql"], result.run_id)
    assert "rejected by alice" in row["result_message"]
    assert row["result_data"]["quality_gate"]["action"] == "ask"


# ------------------------------------------------------------------------------------------ console card


def test_the_console_cards_list_what_the_live_versions_flagged(client, tokens, roots, registry):  # noqa: F811
    """The Live now page (the console app as Airflow's API server mounts it, a real JWT) lists the live index's
    gallery findings and the live bank's suspected defects; a bank built before the check shows none."""
    index, banks = roots
    hygiene = {"counts": {"exact_duplicates": 1, "near_duplicates": 1, "in_both_galleries": 1, "product_outliers": 0},
               "lists": {"exact_duplicates": [["images/normal/1/BRKT01_OK_000.jpg", DUPLICATE]],
                         "near_duplicates": [["images/normal/1/BRKT01_OK_001.jpg", NEAR_DUPLICATE, 0.991]],
                         "in_both_galleries": [[CROSS_GALLERY, DEFECT_KEY]], "product_outliers": []}}
    publish_clip(index, "normal", NORMAL_VERSIONS[0], {**clip_manifest(NORMAL_VERSIONS[0]), "quality": hygiene})
    publish_bank(banks, "BRKT01", BANK_VERSIONS[0])  # before the check: no quality.json
    staging = banks.stage("WOV21")
    for file in ("bank_config.json", "tau.json", "score_histogram.png"):
        (staging / file).write_bytes((banks.live_path("BRKT01") / file).read_bytes())
    (staging / "quality.json").write_text(json.dumps({
        "method": "leave one image out", "tau": 2.25, "images_scored": 21, "seconds": 0.4, "suspected_defects": [
            {"file": name, "score": 3.0 - n / 10, "score_over_tau": (3.0 - n / 10) / 2.25}
            for n, name in enumerate(PLANTED)]}))
    banks.publish("WOV21", staging, BANK_VERSIONS[1])

    page = client.get("/deployments/", headers=bearer(tokens["alice"]))
    assert page.status_code == 200, page.text
    normal = card_html(page.text, "clip:normal")
    assert "Flagged by the quality checks (3)" in normal
    assert f"images/normal/1/BRKT01_OK_000.jpg = {DUPLICATE}" in normal
    assert f"{CROSS_GALLERY} (there: {DEFECT_KEY})" in normal and "(cosine 0.991)" in normal
    bank = card_html(page.text, "WOV21")
    assert "Flagged by the quality checks (1)" in bank
    assert "3 normal images of 21 score 1.05x tau or more out of sample" in bank
    assert all(name in bank for name in PLANTED)
    assert "Flagged by the quality checks" not in card_html(page.text, "BRKT01")
