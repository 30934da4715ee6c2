"""Runs in progress on the Deployments page, against real parts (issue #15 item 10).

- The real DAGs through ``dag.test()`` (S3 server, MariaDB, the BashOperator running build_patchcore.sh):
  a CLIP run's ``download``/``embed`` figures and a PatchCore run's ``prepare``/``build`` figures (the
  builder's progress file, relayed by the build task's own process) land in the run's ``deployment_logs``
  row as its tasks log them. Only a ``running`` row takes them, so their presence in the closed row
  proves they were written during the run.
- The console (mounted by Airflow's ``init_plugins``, real JWTs, the real registry) shows a running run's
  stage with the figures the real reporter wrote, in ``/runs.json``, on the Live now page and in the
  section its script refetches; a waiting approval links to the ``approve`` task's Required Actions.
  Only Airflow's REST API is stood in for (its run and task-instance listings), by a local HTTP server
  that records the token it was asked with.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from inspection_refresh.progress import Progress, progress_file_writer
from inspection_refresh.tasks.live_progress import ProgressFileRelay, stage_reporter

from tests.integration.dag_runner import clip_dag_env, patchcore_dag_env, run_dag
from tests.integration.test_console_app import (  # noqa: F401 (fixtures)
    auth_manager, bearer, client, console_database, registry, tokens,
)
from tests.samples import sample_jpeg

CLIP_RUN = "manual__2026-12-03T10:00:00+00:00_Live0001"
PATCHCORE_RUN = "manual__2026-12-03T11:00:00+00:00_Live0002"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class AirflowRunsApi:
    """Airflow's REST API as far as the console asks it: ``POST /api/v2/dags/~/dagRuns/list`` and a run's
    ``GET .../taskInstances``; answers from ``runs`` and ``tasks`` with Airflow's filters applied."""

    def __init__(self) -> None:
        self.runs: list[dict] = []
        self.tasks: dict[tuple[str, str], list[dict]] = {}
        self.tokens: list[str | None] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                api.tokens.append(self.headers.get("authorization"))
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                assert self.path == "/api/v2/dags/~/dagRuns/list", self.path
                self._answer({"dag_runs": [run for run in api.runs if run["dag_id"] in body["dag_ids"]
                                           and run["state"] in body["states"]]})

            def do_GET(self) -> None:  # noqa: N802
                api.tokens.append(self.headers.get("authorization"))
                url = urlsplit(self.path)
                match = re.fullmatch(r"/api/v2/dags/([^/]+)/dagRuns/([^/]+)/taskInstances", url.path)
                assert match, self.path
                states = parse_qs(url.query)["state"]
                tasks = api.tasks.get((unquote(match[1]), unquote(match[2])), [])
                self._answer({"task_instances": [t for t in tasks if t["state"] in states]})

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_run(self, dag_id: str, run_id: str, tasks: list[tuple[str, int, str | None, str]]) -> None:
        """A running run with task instances ``(task_id, map_index, rendered_map_index, state)``."""
        self.runs.append({"dag_id": dag_id, "dag_run_id": run_id, "state": "running",
                          "start_date": "2026-12-03T10:00:01+00:00"})
        self.tasks[(dag_id, run_id)] = [{"task_id": t, "map_index": i, "rendered_map_index": r, "state": s}
                                        for t, i, r, s in tasks]


@pytest.fixture
def runs_api(monkeypatch):
    api = AirflowRunsApi()
    monkeypatch.setenv("INSPECTION_AIRFLOW_API_URL", api.url)
    yield api
    api.server.shutdown()
    api.server.server_close()


def _report_embedding(registry, run_id: str) -> Progress:
    """The real reporter behind a real Progress: 120 of 650 images embedded at 40 images/s."""
    clock = FakeClock()
    progress = Progress("Embedding normal images", total=650, unit="images", interval=5.0, clock=clock,
                        logger=logging.getLogger("test.embed"),
                        reporter=stage_reporter(lambda: registry, "clip_index_normal", run_id, "embed", min_interval=0))
    progress.update(40)  # the first batch: warm-up, no line
    for _ in range(2):
        clock.now += 1.0
        progress.update(40)
    clock.now += 5.0
    progress.update(0)  # the interval passed: a line (and a report)
    return progress


# --------------------------------------------------------------------------- the console
def test_a_running_clip_run_shows_its_stage_and_the_logged_figures(registry, client, tokens, runs_api):
    registry.start("clip_rebuild", "clip_index_normal", CLIP_RUN)
    progress = _report_embedding(registry, CLIP_RUN)
    runs_api.add_run("clip_index_normal", CLIP_RUN, [("download", -1, None, "success"), ("embed", -1, None, "running")])

    answer = client.get("/deployments/runs.json", headers=bearer(tokens["victor"]))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["problem"] is None
    [run] = body["runs"]
    assert (run["dag_id"], run["run_id"], run["state"]) == ("clip_index_normal", CLIP_RUN, "running")
    assert run["url"].endswith(f"/dags/clip_index_normal/runs/{CLIP_RUN.replace(':', '%3A').replace('+', '%2B')}")
    [stage] = run["stages"]  # the finished download is not a stage at work, and left no figures
    figures = stage["figures"]
    assert (stage["key"], stage["title"], stage["state"]) == ("embed", "embed", "running")
    assert (figures["done"], figures["total"], figures["unit"], figures["finished"]) == (120, 650, "images", False)
    assert figures["line"] == progress.line() == "Embedding normal images: 120/650 images (18%), 11.4 images/s, ETA 46s"
    assert runs_api.tokens and set(runs_api.tokens) == {f"Bearer {tokens['victor']}"}  # asked as the viewer

    # The page holds the section's place and the script that fills it from /runs/section (and refreshes it).
    asked = len(runs_api.tokens)
    page = client.get("/deployments/", headers=bearer(tokens["victor"]))
    assert len(runs_api.tokens) == asked  # the page itself never waits for Airflow's REST API
    assert re.search(r'<section class="runs" id="runs-in-progress" [^>]*data-refresh-url="/deployments/runs/section"',
                     page.text)
    assert '<script src="/deployments/static/runs.js" defer></script>' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/deployments/static/runs.js", headers=bearer(tokens["victor"]))
    assert script.status_code == 200 and "runs-in-progress" in script.text and "data-refresh-url" in script.text
    section = client.get("/deployments/runs/section", headers=bearer(tokens["victor"])).text
    row = re.search(r'<tr class="stage state-running" data-stage="embed">(.*?)</tr>', section, re.S)
    assert row and "120/650 images (18%)" in row.group(1) and "ETA 46s" in row.group(1), section
    assert section.lstrip().startswith("<section") and f'data-run-id="{CLIP_RUN}"' in section

    # Once the run closes its row, the figures stay as they were: a late report changes nothing.
    registry.finish("clip_rebuild", "clip_index_normal", CLIP_RUN, status="completed", message="published")
    assert not registry.report_progress("clip_index_normal", CLIP_RUN, "embed", {"done": 1})
    assert registry.find_run("clip_index_normal", CLIP_RUN)["result_data"]["progress"]["embed"]["done"] == 120


def test_a_patchcore_build_and_a_waiting_approval(registry, client, tokens, runs_api, tmp_path):
    registry.start("patchcore_create", "patchcore_memory_bank", PATCHCORE_RUN)
    # The build script's side: reports into its progress file; the build task's side: the relay.
    path = tmp_path / "progress.json"
    relay = ProgressFileRelay(path, stage_reporter(lambda: registry, "patchcore_memory_bank", PATCHCORE_RUN,
                                                   "build TEX01", min_interval=0), interval=0.05).start()
    clock = FakeClock()
    progress = Progress("extract TEX01 train", total=200, unit="images", interval=0.0, clock=clock,
                        logger=logging.getLogger("test.build"), reporter=progress_file_writer(path))
    for _ in range(3):
        clock.now += 2.0
        progress.update(25)
    relay.stop()
    runs_api.add_run("patchcore_memory_bank", PATCHCORE_RUN, [
        ("product.prepare", 0, "TEX01", "success"), ("product.build", 0, "TEX01", "running"),
        ("product.build", 1, "FABR02", "queued")])
    runs_api.add_run("clip_index_defect", CLIP_RUN, [("approve", -1, None, "awaiting_input")])

    body = client.get("/deployments/runs.json", headers=bearer(tokens["alice"])).json()
    runs = {run["dag_id"]: run for run in body["runs"]}
    build, queued = runs["patchcore_memory_bank"]["stages"]
    assert (build["key"], build["state"], queued["title"]) == ("build TEX01", "running", "build FABR02 (queued)")
    assert (build["figures"]["done"], build["figures"]["total"]) == (75, 200)
    assert build["figures"]["line"] == "extract TEX01 train: 75/200 images (38%), 12.5 images/s, ETA 10s"
    [waiting] = runs["clip_index_defect"]["stages"]
    approval = f"/dags/clip_index_defect/runs/{CLIP_RUN.replace(':', '%3A').replace('+', '%2B')}/tasks/approve/required_actions"
    assert waiting["title"] == "waiting for approval" and waiting["approval_url"].endswith(approval)

    section = client.get("/deployments/runs/section", headers=bearer(tokens["alice"])).text
    assert re.search(rf'<a class="approval-link" href="[^"]*{re.escape(approval)}">waiting for approval</a>', section)
    assert "extract TEX01 train: 75/200 images (38%)" in section


def test_unreachable_airflow_is_said_in_the_section(registry, client, tokens, monkeypatch):
    monkeypatch.setenv("INSPECTION_AIRFLOW_API_URL", "http://127.0.0.1:9")  # nothing listens there
    answer = client.get("/deployments/runs/section", headers=bearer(tokens["alice"]))
    assert answer.status_code == 200
    assert re.search(r'<p class="notice runs-problem">cannot list the runs in progress: ConnectError', answer.text)
    assert client.get("/deployments/runs.json", headers=bearer(tokens["alice"])).json()["runs"] == []
    for path in ("/deployments/runs.json", "/deployments/runs/section", "/deployments/static/runs.js"):
        assert client.get(path, headers=bearer(tokens["nobody"])).status_code == 403, path


# --------------------------------------------------------------------------- the real DAGs
@pytest.mark.slow
def test_a_clip_run_writes_its_download_and_embed_figures_while_running(s3_server, mysql_database, airflow_db,
                                                                         clip_checkpoint, sql, tmp_path, monkeypatch):
    env = clip_dag_env("progress", clip_checkpoint, sql, tmp_path, monkeypatch)
    for seq in range(6):
        env["put"](f"images/normal/1/BRKT01_OK_{seq:03d}.jpg", sample_jpeg(0, seq, size=(320, 240)))
    result = run_dag("clip_index_normal", {"skip_if_unchanged": False})
    assert result.state == "success", result.task_states
    [row] = sql("SELECT result_data FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
                (result.run_id,))
    progress = json.loads(row["result_data"])["progress"]
    assert set(progress) == {"download", "embed"}
    assert (progress["download"]["done"], progress["download"]["total"], progress["download"]["unit"]) == (6, 6, "files")
    assert (progress["embed"]["done"], progress["embed"]["total"], progress["embed"]["unit"]) == (6, 6, "images")
    assert progress["embed"]["finished"] and progress["embed"]["line"].startswith("Embedding normal images: 6/6 images")


@pytest.mark.slow
def test_a_patchcore_build_script_progress_is_relayed_to_the_row(s3_server, mysql_database, airflow_db, sql,
                                                                 tmp_path, monkeypatch):
    with patchcore_dag_env("progress", "(11, 'TEX01', 'Textured panel', 1)", sql, tmp_path, monkeypatch):
        result = run_dag("patchcore_memory_bank", {"shorter": 128, "coreset": 0.1})
    assert result.state == "success", result.task_states
    [row] = sql("SELECT result_data FROM deployment_logs WHERE JSON_VALUE(result_data, '$.airflow_run_id') = %s",
                (result.run_id,))
    progress = json.loads(row["result_data"])["progress"]
    assert set(progress) == {"prepare TEX01", "build TEX01"}
    build = progress["build TEX01"]
    # The script's last line (it has no database credentials: its file, relayed by the build task's process).
    assert build["finished"] and build["done"] == build["total"] > 0, build
    assert build["line"].startswith("[TEX01] ") and build["unit"] in ("images", "picks"), build
    assert progress["prepare TEX01"]["unit"] == "files" and progress["prepare TEX01"]["finished"]
