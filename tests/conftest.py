"""Real parts for every test: an S3 server over HTTP, MariaDB, and a migrated Airflow DB.

Airflow reads its configuration when first imported, so the environment is set
here at import time, before any test module imports Airflow or the DAGs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from inspection_refresh import compose

REPO = Path(__file__).resolve().parents[1]
SESSION_DIR = Path(tempfile.mkdtemp(prefix="inspection-tests-"))
S3_ACCESS_KEY = "test-access-key"
S3_SECRET_KEY = "test-secret-key"
TEST_BUCKET = "inspection-test"

os.environ.update({
    "AIRFLOW_HOME": str(SESSION_DIR / "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{SESSION_DIR / 'airflow' / 'airflow.db'}",
    "INSPECTION_RETRY_DELAY_SECONDS": "1",
    "INSPECTION_DATA_ROOT": str(SESSION_DIR / "data"),
    "INSPECTION_INDEX_ROOT": str(SESSION_DIR / "data" / "clip_index"),
    "INSPECTION_PATCHCORE_ROOT": str(SESSION_DIR / "data" / "patchCore"),
    "INSPECTION_CACHE_ROOT": str(SESSION_DIR / "data" / "cache"),
    "INSPECTION_BUCKET": TEST_BUCKET,
    "INSPECTION_PATCHCORE_WEIGHTS": "random",
    "INSPECTION_CLIP_PRETRAINED": str(SESSION_DIR / "weights" / "clip-vit-b-32-random.pt"),
})
(SESSION_DIR / "airflow").mkdir(parents=True, exist_ok=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds}s")


def storage_connection(endpoint: str, access_key: str = S3_ACCESS_KEY) -> str:
    import json

    return json.dumps({"conn_type": "aws", "login": access_key, "password": S3_SECRET_KEY,
                       "extra": {"endpoint_url": endpoint, "region_name": "kr-standard"}})


class S3Server:
    """The NCP-like emulator (moto behind a proxy refusing ListObjectsV2) in its own process."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(SESSION_DIR / "s3.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "inspection_refresh.dev.ncp_emulator", "--port", str(self.port),
             "--access-key", S3_ACCESS_KEY],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        _wait_for_port(self.port)

    def set_faults(self, **spec) -> None:
        from inspection_refresh.dev.ncp_emulator import set_faults

        set_faults(self.endpoint, **spec)

    @contextmanager
    def faults(self, **spec) -> Iterator[None]:
        """Inject faults for the block (``set_faults`` keywords), then make the server healthy again."""
        self.set_faults(**spec)
        try:
            yield
        finally:
            self.set_faults(latency_ms=0, cut_body={}, slowdown_rate=0, cut_rate=0, always_fail=[], slow_upload={})

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    os.environ["AIRFLOW_CONN_NCP_OBJECT_STORAGE"] = storage_connection(server.endpoint)

    client = compose.object_storage().client
    client.create_bucket(Bucket=TEST_BUCKET, CreateBucketConfiguration={"LocationConstraint": "kr-standard"})
    yield server
    server.stop()


@pytest.fixture
def storage(s3_server):
    """A fresh bucket per test, through the project's storage layer."""

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    store = compose.object_storage(bucket=bucket, max_transfers=4, backoff_seconds=0.05)
    store.client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "kr-standard"})
    return store


def _mysql_settings() -> dict:
    return {"host": os.environ.get("INSPECTION_MYSQL_HOST", "127.0.0.1"),
            "port": int(os.environ.get("INSPECTION_MYSQL_PORT", "3306")),
            "user": os.environ.get("INSPECTION_MYSQL_USER", "root"),
            "password": os.environ.get("INSPECTION_MYSQL_PASSWORD", "")}


def _start_private_mariadb() -> None:
    """No server answers: start the project's private MariaDB (scripts/lib.sh) and use it."""
    out = subprocess.run(
        ["bash", "-c", f'source "{REPO}/scripts/lib.sh" && ensure_mysql >&2 && echo "$INSPECTION_MYSQL_PORT"'],
        check=True, capture_output=True, text=True, env={**os.environ, "INSPECTION_MYSQL_PORT": "3407"},
    )
    os.environ["INSPECTION_MYSQL_PORT"] = out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def mysql_database():
    """A throw-away database on the real MariaDB; ``AIRFLOW_CONN_DEPLOY_DB`` points at it."""
    import json

    import MySQLdb

    try:
        MySQLdb.connect(**_mysql_settings()).close()
    except MySQLdb.OperationalError:
        _start_private_mariadb()
    settings = _mysql_settings()
    name = f"inspection_test_{uuid.uuid4().hex[:8]}"
    conn = MySQLdb.connect(**settings)
    conn.cursor().execute(f"CREATE DATABASE `{name}`")
    os.environ["AIRFLOW_CONN_DEPLOY_DB"] = json.dumps({
        "conn_type": "mysql", "host": settings["host"], "port": settings["port"], "login": settings["user"],
        "password": settings["password"], "schema": name})
    yield {**settings, "database": name}
    conn.cursor().execute(f"DROP DATABASE `{name}`")
    conn.close()


@pytest.fixture
def sql(mysql_database):
    """Run SQL on the test database: ``sql("SELECT ...", params)`` returns rows as dicts."""
    import MySQLdb
    import MySQLdb.cursors

    conn = MySQLdb.connect(**mysql_database, cursorclass=MySQLdb.cursors.DictCursor, autocommit=True)

    def run(statement: str, params: tuple = ()):
        cursor = conn.cursor()
        cursor.execute(statement, params)
        return list(cursor.fetchall())

    yield run
    conn.close()


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata DB (SQLite) for ``dag.test()``."""
    subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], check=True,
                   capture_output=True, env=os.environ.copy())
    from airflow import settings

    settings.configure_orm()
    return SESSION_DIR / "airflow"


@pytest.fixture(scope="session")
def clip_checkpoint():
    """A random-init ViT-B-32 checkpoint (pretrained weights cannot be downloaded offline)."""
    from inspection_refresh.clip.weights import create_random_checkpoint

    path = Path(os.environ["INSPECTION_CLIP_PRETRAINED"])
    if not path.exists():
        create_random_checkpoint(path, model_name="ViT-B-32", seed=0)
    return path


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_DIR, ignore_errors=True)
