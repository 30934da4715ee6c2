"""The node agent as a serving host installs it: ``pip install "inspection-refresh[agent]"`` into a fresh venv
(no Airflow, torch or numpy there), pulling from the real S3 test server: a signed version verified and installed,
a tampered object and a manifest path escape refused, and without boto3 a one-line message saying what to install.

Slow: pip downloads boto3 and cryptography from PyPI (about a minute)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from inspection_refresh import compose

from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.integration.test_release_channel import PREFIX, env, get, node_publisher, put, tree
from tests.integration.test_release_signing import publish_files, sign_with

__all__ = ["env"]  # the fixture, shared with test_release_channel

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory) -> Path:
    """A fresh venv with only ``.[agent]``, installed from a copy of the package (pip builds in the tree it is
    given: the working tree stays clean)."""
    base = tmp_path_factory.mktemp("agent-venv")
    source = base / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source / "pyproject.toml")
    shutil.copytree(REPO / "include", source / "include",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                           f"{source}[agent]"], capture_output=True, text=True, timeout=600, env=_clean_env())
    if done.returncode != 0:
        pytest.fail(f"pip install {source}[agent] failed (needs PyPI):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return venv


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without what would let the venv see this repository's venv or package."""
    return {**{k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("AIRFLOW_CONN_")}, **extra}


def agent_pull(env, venv: Path, node: Path, *args: str) -> subprocess.CompletedProcess:
    """``inspection-publish pull`` of the venv: its console script, credentials from the AWS variables."""
    return subprocess.run(
        [str(venv / "bin" / "inspection-publish"), "pull", "--endpoint-url", env.endpoint, "--region", "kr-standard",
         "--bucket", env.bucket, "--channel-prefix", PREFIX, "--index-root", str(node / "clip_index"),
         "--artefact", "clip:normal", *args],
        capture_output=True, text=True, timeout=300, cwd=node.parent,
        env=_clean_env(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY))


def errors(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if " ERROR " in line]


def test_the_agent_installed_with_only_its_extra_pulls_verifies_and_refuses(env, agent_venv, monkeypatch):
    python = str(agent_venv / "bin" / "python")
    probe = ("import importlib.util as u, inspection_refresh; "
             "print(inspection_refresh.__file__); "
             "print(','.join(m for m in ('airflow', 'torch', 'numpy', 'faiss', 'PIL') if u.find_spec(m)) or 'none')")
    where, heavy = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True, timeout=60,
                                  env=_clean_env(), cwd=env.tmp).stdout.split()
    assert where.startswith(str(agent_venv)), where  # the installed package, not this repository's
    assert heavy == "none"

    # The key pair made with the venv's own keygen (no Airflow needed for that either).
    made = subprocess.run([str(agent_venv / "bin" / "inspection-publish"), "keygen", "--out", str(env.tmp / "keys")],
                          capture_output=True, text=True, timeout=60, env=_clean_env(), cwd=env.tmp)
    assert made.returncode == 0, made.stderr
    keys = SimpleNamespace(id=made.stdout.split()[1], public=env.tmp / "keys" / "release-signing.pub",
                           private=(env.tmp / "keys" / "release-signing.key").read_bytes())
    sign_with(monkeypatch, keys)
    node = env.tmp / "node"
    v1 = publish_files(seed=1)
    done = agent_pull(env, agent_venv, node, "--trusted-key", str(keys.public))
    assert done.returncode == 0, done.stderr
    assert f"clip:normal: none -> {v1}, 5 files, " in done.stderr and f"signed by key {keys.id}" in done.stderr
    assert tree(node / "clip_index" / "normal") == tree(compose.index_publisher().releases / "normal" / v1)

    # A tampered object (same size): refused with its key, the node keeps v1.
    v2 = publish_files(seed=2)
    key = f"{PREFIX}clip/normal/{v2}/faiss_index.bin"
    original = get(env, key)
    put(env, key, original[:-8] + b"tampered")
    done = agent_pull(env, agent_venv, node, "--trusted-key", str(keys.public))
    assert done.returncode == 1
    [line] = errors(done)
    assert f"s3://{env.bucket}/{key} has sha256" in line and f"version {v1} stays live" in line
    assert node_publisher(node).current("normal") == v1
    put(env, key, original)

    # A manifest naming a path outside the version directory (and current.json made to match): refused.
    prefix = f"{PREFIX}clip/normal/{v2}/"
    manifest = json.loads(get(env, prefix + ".release-manifest.json"))
    manifest["files"]["../../../escape.sh"] = {"sha256": hashlib.sha256(b"x").hexdigest(), "size": 1}
    data = json.dumps(manifest).encode()
    put(env, prefix + "../../../escape.sh", b"x")
    put(env, prefix + ".release-manifest.json", data)
    pointer = json.loads(get(env, f"{PREFIX}clip/normal/current.json"))
    pointer["manifest_sha256"] = hashlib.sha256(data).hexdigest()
    put(env, f"{PREFIX}clip/normal/current.json", json.dumps(pointer).encode())
    done = agent_pull(env, agent_venv, node)  # no key: the path check holds without signatures too
    assert done.returncode == 1
    [line] = errors(done)
    assert "names the path '../../../escape.sh', which escapes the version directory" in line, line
    assert node_publisher(node).current("normal") == v1 and not list(env.tmp.rglob("escape.sh"))

    # The same host without boto3: one line saying what to install, exit 2, no traceback.
    subprocess.run([str(agent_venv / "bin" / "pip"), "uninstall", "--quiet", "--yes", "boto3"], check=True,
                   capture_output=True, timeout=120, env=_clean_env())
    done = agent_pull(env, agent_venv, node)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ['inspection-publish pull needs boto3: pip install "inspection-refresh[agent]"']
