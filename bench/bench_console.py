"""Benchmark: response time of the Deployments console's pages with 1,000 history rows.

Seeds 1,000 ``deployment_logs`` rows (CLIP rebuilds, PatchCore runs with four products, rollbacks,
some failed, result_data as large as the DAGs write) into a scratch database on the MariaDB at
127.0.0.1:3306 (dropped afterwards), publishes two CLIP indexes and four PatchCore banks with five
kept versions each into a temporary root, and times the pages through FastAPI's TestClient with a
real SimpleAuthManager JWT: the same code path as in the API server minus the network. Writes
``bench/results/console.json``.

Target (issue #8): every page in under a second (p95 and worst of the repetitions).

Usage::

    .venv/bin/python bench/bench_console.py [--rows 1000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from inspection_refresh import compose

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "console.json"
TARGET_SECONDS = 1.0
PRODUCTS = ("BRKT01", "GEAR02", "SHFT03", "PLTE04")


def mysql_settings() -> dict:
    return {"host": os.environ.get("INSPECTION_MYSQL_HOST", "127.0.0.1"),
            "port": int(os.environ.get("INSPECTION_MYSQL_PORT", "3306")),
            "user": os.environ.get("INSPECTION_MYSQL_USER", "root"),
            "password": os.environ.get("INSPECTION_MYSQL_PASSWORD", "")}


def history_rows(count: int) -> list[tuple]:
    """``count`` rows shaped like the DAGs' own: (deploy_type, status, message, result_data, deployed_by)."""
    rows = []
    for n in range(count):
        run = {"airflow_run_id": f"scheduled__2026-{1 + n % 12:02d}-{1 + n % 28:02d}T02:00:00+00:00_{n}"}
        failed = n % 7 == 0
        if n % 10 == 9:
            data = {**run, "airflow_dag_id": "deployment_rollback", "artefact": "clip:normal", "action": "rollback",
                    "requested_version": "previous", "from_version": f"v{n}", "to_version": f"v{n - 1}",
                    "pin": {"version": f"v{n - 1}", "pinned_by": "airflow:alice"}}
            rows.append(("rollback", "completed", f"clip:normal rolled back from v{n} to v{n - 1} by airflow:alice",
                         data, "airflow:alice"))
        elif n % 3 == 0:
            products = {code: {"status": "failed" if failed and i == 1 else "published", "product_id": i,
                               "num_images": 60, "bank_size": 3000 + i, "feature_dim": 1536,
                               "tau": {"pixel": 1.2, "image": 2.3}, "auroc": 0.93, "accuracy_at_tau": 0.9,
                               "version": f"2026{n:010d}Z", "path": f"/data/patchCore/{code}"}
                        for i, code in enumerate(PRODUCTS)}
            data = {**run, "airflow_dag_id": "patchcore_memory_bank", "products": products, "pinned": {},
                    "settings": {"coreset": 0.1, "shorter": 256, "stride": 1, "layers": ["layer2", "layer3"],
                                 "weights": "imagenet", "script": "build_patchcore.sh"}}
            message = ("1 of 4 products failed: GEAR02 at build: CUDA out of memory" if failed
                       else "4 PatchCore banks published: " + ", ".join(f"{c} (3000x1536)" for c in PRODUCTS))
            rows.append(("patchcore_create", "failed" if failed else "completed", message, data, "airflow-scheduler"))
        else:
            index_type = "normal" if n % 2 else "defect"
            skipped = [[f"images/{index_type}/{n}/readme_{k}.txt", "not an image"] for k in range(50)]
            data = {**run, "airflow_dag_id": f"clip_index_{index_type}", "index_type": index_type,
                    "source_prefix": f"images/{index_type}/", "model": "ViT-B-32", "pretrained": "openai",
                    "random_weights": False, "num_images": 12000, "embedding_dim": 512, "embedded": 40,
                    "cached": 11960, "skipped_objects": skipped + ["... and 120 more"], "num_skipped_objects": 170,
                    "missing_images": [], "num_missing_images": 0, "version": f"2026{n:010d}Z"}
            rows.append(("clip_rebuild", "failed" if failed else "completed",
                         f"{index_type} index version 2026{n:010d}Z published: 12,000 images (40 embedded, "
                         "11,960 cached, 170 objects skipped (see skipped_objects)), dim 512", data, "airflow-scheduler"))
    return rows


def publish_artefacts() -> None:
    from inspection_refresh.config import get_settings

    settings = get_settings()
    index, banks = compose.index_publisher(settings), compose.patchcore_publisher(settings)
    for k in range(5):
        version = f"2026110{k + 1}T020000000000Z"
        for name in ("normal", "defect"):
            staging = index.stage(name)
            (staging / "manifest.json").write_text(json.dumps({
                "index_type": name, "model": "ViT-B-32", "pretrained": "openai", "count": 12000, "dim": 512,
                "model_identity": "ViT-B-32/openai|open_clip-3.3.0|rgb-squash224-bilinear-clipnorm-v1",
                "run_id": f"scheduled__{version}", "created_at": "2026-11-01T02:00:00+00:00"}))
            index.publish(name, staging, version)
        for code in PRODUCTS:
            staging = banks.stage(code)
            (staging / "bank_config.json").write_text(json.dumps({
                "layers": ["layer2", "layer3"], "shorter": 256, "stride": 1, "bank_size": 3000, "feature_dim": 1536,
                "num_images": 60, "weights": {"name": "imagenet", "sha256": "11ad3fa6" * 8},
                "calibration": {"auroc": 0.93, "accuracy_at_tau": 0.9}, "created": "2026-11-01T02:00:00+00:00"}))
            (staging / "tau.json").write_text(json.dumps({"pixel": 1.2, "image": 2.3}))
            (staging / "score_histogram.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30_000))
            banks.publish(code, staging, version)


def timed(client, url: str, headers: dict, repeat: int) -> dict:
    seconds, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(url, headers=headers)
        seconds.append(time.perf_counter() - started)
        assert response.status_code == 200, (url, response.status_code, response.text[:300])
        size = len(response.content)
    ordered = sorted(seconds)
    return {"median_s": round(statistics.median(seconds), 4),
            "p95_s": round(ordered[max(0, round(0.95 * len(ordered)) - 1)], 4),
            "max_s": round(ordered[-1], 4), "first_s": round(seconds[0], 4), "bytes": size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-console-"))
    database = f"bench_console_{uuid.uuid4().hex[:8]}"
    mysql = mysql_settings()
    os.environ.update({
        "AIRFLOW_HOME": str(workdir / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{workdir / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_BENCH_DB": json.dumps({"conn_type": "mysql", "host": mysql["host"], "port": mysql["port"],
                                             "login": mysql["user"], "password": mysql["password"],
                                             "schema": database}),
        "INSPECTION_DB_CONN_ID": "bench_db",
        "INSPECTION_INDEX_ROOT": str(workdir / "data" / "clip_index"),
        "INSPECTION_PATCHCORE_ROOT": str(workdir / "data" / "patchCore"),
    })
    (workdir / "airflow").mkdir(parents=True)
    import MySQLdb

    admin = MySQLdb.connect(**mysql, autocommit=True)
    admin.cursor().execute(f"CREATE DATABASE `{database}`")
    try:
        # Airflow checks every JWT against its revoked-token table: the metadata DB must exist.
        subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], check=True,
                       capture_output=True, env=os.environ.copy())
        import logging

        logging.disable(logging.WARNING)
        from airflow.api_fastapi.app import init_auth_manager
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
        from fastapi import FastAPI
        from fastapi.testclient import TestClient
        from inspection_refresh.console.app import create_app

        registry = compose.deployment_registry("bench_db")
        registry.ensure_tables()
        conn = MySQLdb.connect(**mysql, database=database, autocommit=True)
        conn.cursor().executemany(
            "INSERT INTO deployment_logs (deploy_type, status, completed_at, result_message, result_data, deployed_by) "
            "VALUES (%s, %s, NOW(), %s, %s, %s)",
            [(t, s, m, json.dumps(d), by) for t, s, m, d, by in history_rows(args.rows)])
        conn.close()
        publish_artefacts()

        token = init_auth_manager().generate_jwt(SimpleAuthManagerUser(username="bench", role="admin"))
        root = FastAPI()
        root.mount("/deployments", create_app())
        headers = {"Authorization": f"Bearer {token}"}
        pages = {
            "history_page_1": "/deployments/history",
            "history_page_10": "/deployments/history?page=10",
            "history_last_page": f"/deployments/history?page={(args.rows + 49) // 50}",
            "history_failed_patchcore": "/deployments/history?deploy_type=patchcore_create&status=failed",
            "live_now": "/deployments/",
        }
        with TestClient(root) as client:
            figures = {name: timed(client, url, headers, args.repeat) for name, url in pages.items()}
        for name, figure in figures.items():
            print(f"{name:26s} median {figure['median_s'] * 1000:7.1f} ms  p95 {figure['p95_s'] * 1000:7.1f} ms  "
                  f"max {figure['max_s'] * 1000:7.1f} ms  {figure['bytes'] / 1000:.0f} kB", flush=True)
        report = {
            "benchmark": "Deployments console page response time (FastAPI TestClient, real MariaDB, real JWT)",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
            "history_rows": args.rows, "page_size": 50, "repeat": args.repeat,
            "artefacts": {"clip_indexes": 2, "patchcore_banks": len(PRODUCTS), "kept_versions_each": 5},
            "figures": figures,
            "targets": {"page_under_s": TARGET_SECONDS},
            "pass": {name: f["max_s"] < TARGET_SECONDS for name, f in figures.items()},
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS}")
        return 0 if all(report["pass"].values()) else 1
    finally:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS `{database}`")
        admin.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
