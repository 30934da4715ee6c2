"""The release channel against the real S3 test server: publishing with targets=both, serving nodes that
pull with the agent (Airflow-independent credentials), tampering, rollback, pins, reload hooks, --watch."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from inspection_refresh import compose
from inspection_refresh.cli import main
from inspection_refresh.config import get_settings
from inspection_refresh.manifests import MANIFEST_NAME
from inspection_refresh.publish import Publisher, PublishError, new_version_id

from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

ROWS, DIM = 12, 32
PREFIX = "deployments/"


@pytest.fixture
def env(storage, s3_server, mysql_database, tmp_path, monkeypatch):
    """An Airflow host publishing to ``both`` (its own roots and the channel in a fresh bucket); its publishers
    lock each artefact in the test database (``deploy_db``), as every Airflow host does."""
    worker = tmp_path / "worker"
    monkeypatch.setenv("INSPECTION_PUBLISH_TARGETS", "both")
    monkeypatch.setenv("INSPECTION_CHANNEL_BUCKET", storage.bucket)
    monkeypatch.setenv("INSPECTION_CHANNEL_PREFIX", PREFIX)
    monkeypatch.setenv("INSPECTION_INDEX_ROOT", str(worker / "clip_index"))
    monkeypatch.setenv("INSPECTION_PATCHCORE_ROOT", str(worker / "patchCore"))
    monkeypatch.delenv("INSPECTION_INDEX_RELEASES", raising=False)
    monkeypatch.delenv("INSPECTION_PATCHCORE_RELEASES", raising=False)
    monkeypatch.setenv("INSPECTION_KEEP_VERSIONS", "3")
    # What a serving host has instead of an Airflow connection.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    return SimpleNamespace(storage=storage, bucket=storage.bucket, endpoint=s3_server.endpoint, tmp=tmp_path)


def image_bytes(i: int) -> bytes:
    """The same bytes in every version, as unchanged images are."""
    return b"\xff\xd8\xff\xe0" + bytes([i]) * (2000 + i)


def publish_clip(seed: int, *, unpin: bool = False) -> tuple[str, "object"]:
    """A small real CLIP index directory (the package's writer), published as a manual or scheduled run does."""
    import numpy as np
    from inspection_refresh.clip.index import METADATA_KEYS, write_index_files

    vectors = np.random.default_rng(seed).standard_normal((ROWS, DIM)).astype("float32")
    publisher = compose.index_publisher()
    version = new_version_id()
    staging = publisher.stage("normal")
    final = staging.parent / version
    paths, metadata = [], []
    for i in range(ROWS):
        (staging / "images").mkdir(exist_ok=True)
        (staging / "images" / f"{i}.jpg").write_bytes(image_bytes(i))
        paths.append(str(final / "images" / f"{i}.jpg"))
        metadata.append({**dict.fromkeys(METADATA_KEYS), "image_id": i, "file_name": f"{i}.jpg",
                         "local_path": paths[-1], "image_type": "normal"})
    write_index_files(staging, vectors, paths, metadata, index_type="normal", model_id="ViT-B-32", pretrained="test")
    publisher.publish("normal", staging, version, unpin=unpin)
    return version, vectors


def publish_bank(code: str, seed: int) -> tuple[str, "object"]:
    """A bank-like directory: memory_bank.pt, bank_config.json, tau.json and ok/ images."""
    import torch

    publisher = compose.patchcore_publisher()
    staging = publisher.stage(code)
    bank = torch.nn.functional.normalize(torch.randn(40, 64, generator=torch.Generator().manual_seed(seed)), dim=1)
    torch.save(bank, staging / "memory_bank.pt")
    (staging / "bank_config.json").write_text(json.dumps({"layers": ["layer2", "layer3"], "shorter": 512, "stride": 2}))
    (staging / "tau.json").write_text(json.dumps({"pixel": 0.4, "image": 0.6}))
    (staging / "ok").mkdir()
    for i in range(3):
        (staging / "ok" / f"{code}_{i}.jpg").write_bytes(image_bytes(100 + i))
    return publisher.publish(code, staging).version, bank


def pull(env, node: Path, *args: str) -> int:
    """``inspection-publish pull`` on a serving node: its own roots, credentials from the AWS variables."""
    return main(["pull", "--endpoint-url", env.endpoint, "--region", "kr-standard", "--bucket", env.bucket,
                 "--index-root", str(node / "clip_index"), "--patchcore-root", str(node / "patchCore"),
                 "--keep", "3", *args])


def node_publisher(node: Path, kind: str = "clip") -> Publisher:
    return Publisher(node / ("clip_index" if kind == "clip" else "patchCore"))


def get(env, key: str) -> bytes:
    return env.storage.client.get_object(Bucket=env.bucket, Key=key)["Body"].read()


def put(env, key: str, body: bytes) -> None:
    env.storage.client.put_object(Bucket=env.bucket, Key=key, Body=body)


def tree(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file the service would read."""
    directory = Path(os.path.realpath(directory))
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def change_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "inspection_refresh.agent" and " -> " in r.getMessage()]


def test_two_nodes_install_identical_verified_versions_the_service_loads(env, caplog):
    import faiss
    import torch
    from inspection_refresh.clip.index import search

    clip_version, vectors = publish_clip(seed=1)
    bank_version, bank = publish_bank("BRKT01", seed=1)
    settings = get_settings()
    worker_clip = settings.index_releases / "normal" / clip_version
    assert compose.index_publisher(settings).current("normal") == clip_version  # "both": published here too

    # The channel: every file under the version prefix, the manifest, then current.json naming its sha256.
    version_prefix = f"{PREFIX}clip/normal/{clip_version}/"
    keys = {o.key for o in env.storage.list_objects(version_prefix)}
    assert keys == {version_prefix + rel for rel in tree(worker_clip)} | {version_prefix + MANIFEST_NAME}
    manifest_bytes = get(env, version_prefix + MANIFEST_NAME)
    manifest = json.loads(manifest_bytes)
    assert {rel: entry["sha256"] for rel, entry in manifest["files"].items()} == tree(worker_clip)
    assert all(entry["size"] == (worker_clip / rel).stat().st_size for rel, entry in manifest["files"].items())
    pointer = json.loads(get(env, f"{PREFIX}clip/normal/current.json"))
    assert pointer["version"] == clip_version
    assert pointer["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert pointer["published_at"] and pointer["published_by"]
    assert json.loads(get(env, f"{PREFIX}patchcore/BRKT01/current.json"))["version"] == bank_version

    nodes = [env.tmp / "node-a", env.tmp / "node-b"]
    with caplog.at_level(logging.INFO, logger="inspection_refresh.agent"):
        for node in nodes:
            assert pull(env, node) == 0  # no --artefact: everything in the channel
    lines = change_lines(caplog)
    assert len(lines) == 4, lines  # one line per change, nothing per file
    assert any(line.startswith(f"clip:normal: none -> {clip_version}, {ROWS + 5} files, ") and
               line.endswith(", verified") for line in lines), lines
    assert any(line.startswith(f"BRKT01: none -> {bank_version}, 6 files, ") for line in lines), lines

    for node in nodes:
        assert os.listdir(node / "clip_index") == ["normal"] and os.listdir(node / "patchCore") == ["BRKT01"]
        assert node_publisher(node).current("normal") == clip_version
        assert node_publisher(node, "patchcore").current("BRKT01") == bank_version
        assert tree(node / "clip_index" / "normal") == tree(worker_clip)
        assert tree(node / "patchCore" / "BRKT01") == tree(settings.patchcore_releases / "BRKT01" / bank_version)
        # What the service loads: the FAISS index finds each stored embedding first; the bank and its config.
        index = faiss.read_index(str(node / "clip_index" / "normal" / "faiss_index.bin"))
        assert (index.ntotal, index.d) == (ROWS, DIM)
        hits = search(node / "clip_index" / "normal", vectors, k=1)
        assert [h[0].row for h in hits] == list(range(ROWS))
        loaded = torch.load(node / "patchCore" / "BRKT01" / "memory_bank.pt", weights_only=True)
        assert torch.equal(loaded, bank)
        assert json.loads((node / "patchCore" / "BRKT01" / "bank_config.json").read_text())["stride"] == 2
    assert tree(nodes[0] / "clip_index" / "normal") == tree(nodes[1] / "clip_index" / "normal")

    caplog.clear()
    assert pull(env, nodes[0]) == 0  # nothing new: nothing to say
    assert change_lines(caplog) == []


def test_a_tampered_or_missing_object_is_refused_and_the_node_keeps_its_version(env, caplog):
    v1, _ = publish_clip(seed=1)
    node = env.tmp / "node"
    assert pull(env, node, "--artefact", "clip:normal") == 0
    v2, _ = publish_clip(seed=2)
    prefix = f"{PREFIX}clip/normal/{v2}/"
    releases = node / "clip_index.releases" / "normal"

    def refused(*expected: str) -> None:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="inspection_refresh.agent"):
            assert pull(env, node, "--artefact", "clip:normal") == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and all(text in errors[0] for text in expected), errors
        assert node_publisher(node).current("normal") == v1
        assert sorted(os.listdir(releases)) == [v1]  # no half-written version, no staging left behind

    # One file's bytes overwritten in the channel (same size).
    original = get(env, prefix + "faiss_index.bin")
    put(env, prefix + "faiss_index.bin", original[:-8] + b"tampered")
    refused(f"s3://{env.bucket}/{prefix}faiss_index.bin has sha256", "the manifest says",
            f"refused version {v2}", f"version {v1} stays live")
    put(env, prefix + "faiss_index.bin", original)

    # An object gone (one that changed: the node would hard-link an unchanged one from its live version).
    embeddings = get(env, prefix + "embeddings.pt")
    env.storage.delete_file(prefix + "embeddings.pt")
    refused(f"s3://{env.bucket}/{prefix}embeddings.pt", "does not exist")
    put(env, prefix + "embeddings.pt", embeddings)

    # The manifest replaced: it no longer matches current.json.
    manifest = get(env, prefix + MANIFEST_NAME)
    put(env, prefix + MANIFEST_NAME, manifest.replace(b'"created_at"', b'"created_at" ', 1))
    refused(f"{prefix}{MANIFEST_NAME} has sha256", "altered after publishing")
    put(env, prefix + MANIFEST_NAME, manifest)

    assert pull(env, node, "--artefact", "clip:normal") == 0  # repaired: installed
    assert node_publisher(node).current("normal") == v2

    # An unchanged image is copied inside the bucket by the next publish, but never a tampered one.
    put(env, prefix + "images/5.jpg", b"\x00" * len(image_bytes(5)))
    v3, _ = publish_clip(seed=3)
    assert get(env, f"{PREFIX}clip/normal/{v3}/images/5.jpg") == image_bytes(5)
    assert pull(env, env.tmp / "fresh-node", "--artefact", "clip:normal") == 0


def test_a_rollback_moves_the_channel_pointer_and_pins_it_for_every_host(env, caplog, capsys):
    node = env.tmp / "node"
    v1, _ = publish_clip(seed=1)
    assert pull(env, node) == 0
    v2, _ = publish_clip(seed=2)
    assert pull(env, node) == 0 and node_publisher(node).current("normal") == v2
    root = str(get_settings().index_root)

    assert main(["rollback", "--root", root, "--name", "normal"]) == 0  # the channel is found from the root
    pointer = json.loads(get(env, f"{PREFIX}clip/normal/current.json"))
    assert (pointer["version"], pointer["action"], pointer["previous"]) == (v1, "rollback", v2)
    assert pointer["published_by"].startswith("cli")
    assert json.loads(get(env, f"{PREFIX}clip/normal/pin.json"))["version"] == v1

    # Another Airflow host sharing the channel sees the pin, though it has no local pin file.
    other = Publisher(env.tmp / "other-host" / "clip_index", channel=compose.release_channel("clip"))
    assert other.pinned("normal")["version"] == v1
    with pytest.raises(PublishError, match=f"pinned to version {v1}"):
        publish_clip(seed=3)  # a scheduled run

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="inspection_refresh.agent"):
        assert pull(env, node) == 0
    assert node_publisher(node).current("normal") == v1  # its kept copy, checked and swapped back
    [line] = change_lines(caplog)
    assert line.startswith(f"clip:normal: {v2} -> {v1}, {ROWS + 5} files, ")
    assert line.endswith(" kB (nothing downloaded), verified")

    capsys.readouterr()
    assert main(["list", "--root", root, "--name", "normal"]) == 0
    assert f"current {v1}; versions: {v1}, {v2}" in capsys.readouterr().out
    assert main(["unpin", "--root", root, "--name", "normal"]) == 0
    assert other.pinned("normal") is None
    v3, _ = publish_clip(seed=3)
    assert pull(env, node) == 0 and node_publisher(node).current("normal") == v3


class _Recorder(BaseHTTPRequestHandler):
    posts: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_reload_hooks_run_only_after_a_swap(env, caplog):
    marker = env.tmp / "reloads.txt"
    script = "import os, sys; open(sys.argv[1], 'a').write(os.environ['INSPECTION_PULLED'] + '\\n')"
    command = shlex.join([sys.executable, "-c", script, str(marker)])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.posts = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/reload"
    node = env.tmp / "node"
    hooks = ("--reload-command", command, "--reload-url", url)
    try:
        v1, _ = publish_clip(seed=1)
        publish_bank("BRKT01", seed=1)
        with caplog.at_level(logging.INFO, logger="inspection_refresh.agent"):
            assert pull(env, node, *hooks) == 0
        assert marker.read_text().splitlines() == ["clip:normal BRKT01"]  # once per pull, after the swaps
        assert _Recorder.posts == [{"artefacts": ["clip:normal", "BRKT01"]}]
        assert all(line.endswith("verified, reload ok") for line in change_lines(caplog))

        assert pull(env, node, *hooks) == 0  # nothing changed: no reload
        assert marker.read_text().splitlines() == ["clip:normal BRKT01"] and len(_Recorder.posts) == 1

        v2, _ = publish_clip(seed=2)
        assert pull(env, node, *hooks) == 0
        assert marker.read_text().splitlines() == ["clip:normal BRKT01", "clip:normal"]
        assert _Recorder.posts[-1] == {"artefacts": ["clip:normal"]}

        v3, _ = publish_clip(seed=3)
        caplog.clear()
        failing = shlex.join([sys.executable, "-c", "import sys; sys.exit(3)"])
        with caplog.at_level(logging.INFO, logger="inspection_refresh.agent"):
            assert pull(env, node, "--reload-command", failing) == 1  # the swap stands, the exit code says so
        assert node_publisher(node).current("normal") == v3
        assert change_lines(caplog)[0].endswith("reload failed: " + sys.executable + " exited 3")
    finally:
        server.shutdown()


def test_watch_installs_each_new_version(env):
    v1, _ = publish_clip(seed=1)
    node = env.tmp / "node"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}  # no Airflow here
    code = ("import sys; from inspection_refresh.cli import main; rc = main(sys.argv[1:]); "
            "print('airflow imported:', any(m.split('.')[0] == 'airflow' for m in sys.modules), flush=True); "
            "sys.exit(rc)")
    process = subprocess.Popen(
        [sys.executable, "-c", code, "pull", "--watch", "--interval", "0.3", "--artefact", "clip:normal",
         "--endpoint-url", env.endpoint, "--bucket", env.bucket, "--index-root", str(node / "clip_index")],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + 60
        while node_publisher(node).current("normal") != version:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, f"the agent did not install {version}"
            time.sleep(0.1)

    try:
        wait_for(v1)
        v2, _ = publish_clip(seed=2)
        wait_for(v2)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert f"clip:normal: none -> {v1}" in output and f"clip:normal: {v1} -> {v2}" in output
    assert "airflow imported: False" in output


def test_the_channel_keeps_n_versions_but_never_the_current_or_pinned_one(env, monkeypatch, caplog):
    monkeypatch.setenv("INSPECTION_KEEP_VERSIONS", "2")
    dead = f"{PREFIX}clip/normal/20200101T000000000000Z/faiss_index.bin"  # an upload that died long ago
    put(env, dead, b"half")
    with caplog.at_level(logging.INFO, logger="inspection_refresh.agent"):
        v1, _ = publish_clip(seed=1)
        v2, _ = publish_clip(seed=2)
        v3, _ = publish_clip(seed=3)
    channel = compose.release_channel("clip")
    assert channel.versions("normal") == [v2, v3]
    assert not [o for o in env.storage.list_objects(f"{PREFIX}clip/normal/") if o.key == dead]
    uploads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Uploaded clip:normal")]
    assert f"({ROWS} unchanged, copied in the bucket)" in uploads[1]  # the images of v1, not sent again

    compose.index_publisher().rollback("normal", v2, pinned_by="test")
    v4, _ = publish_clip(seed=4, unpin=True)  # a manual run: publishes over the pin and removes it
    # The pin goes right before the pointer moves: v2 is then neither current nor pinned, so the newest two stay.
    assert channel.versions("normal") == [v3, v4]
    assert json.loads(get(env, f"{PREFIX}clip/normal/current.json"))["version"] == v4
    assert channel.read_pin("normal") is None


def test_publish_targets_setting(env, monkeypatch):
    monkeypatch.setenv("INSPECTION_PUBLISH_TARGETS", "local")
    assert compose.index_publisher().channel is None
    monkeypatch.setenv("INSPECTION_PUBLISH_TARGETS", "channel")
    assert compose.patchcore_publisher().channel.kind == "patchcore"
    monkeypatch.setenv("INSPECTION_PUBLISH_TARGETS", "s3")
    with pytest.raises(ValueError, match="INSPECTION_PUBLISH_TARGETS"):
        get_settings()


def test_push_puts_a_version_published_before_the_channel_into_it(env, monkeypatch, capsys):
    monkeypatch.setenv("INSPECTION_PUBLISH_TARGETS", "local")
    v1, vectors = publish_clip(seed=1)  # before the channel was switched on: this host only
    assert not list(env.storage.list_objects(PREFIX))
    monkeypatch.setenv("INSPECTION_PUBLISH_TARGETS", "channel")
    root = str(get_settings().index_root)
    assert main(["push", "--root", root, "--name", "normal"]) == 0
    assert f"current version is now {v1}" in capsys.readouterr().out
    pointer = json.loads(get(env, f"{PREFIX}clip/normal/current.json"))
    assert (pointer["version"], pointer["action"]) == (v1, "push")
    node = env.tmp / "node"
    assert pull(env, node, "--artefact", "clip:normal") == 0
    assert tree(node / "clip_index" / "normal") == tree(get_settings().index_releases / "normal" / v1)
    assert main(["push", "--root", root, "--name", "normal", "--to", "nope"]) == 1
