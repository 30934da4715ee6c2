"""Releases a serving host can authenticate, against the real S3 test server: the Airflow side signs each
manifest with the key in an Airflow connection (INSPECTION_SIGNING_CONN_ID), a node with --trusted-key installs
only what a trusted key signed (rotation: several keys), the key never shows; and manifest paths that would
leave the version directory are refused."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import botocore.client
import pytest
from inspection_refresh import compose
from inspection_refresh.manifests import MANIFEST_NAME, SIGNATURE_NAME
from inspection_refresh.publish import PublishError, new_version_id
from inspection_refresh.signing import generate_key_pair

from tests.integration.test_release_channel import PREFIX, change_lines, env, get, node_publisher, pull, put, tree

__all__ = ["env"]  # the fixture, shared with test_release_channel

CONN_ID = "release_signing"


class Keys:
    """A key pair as ``inspection-publish keygen`` makes it: the public key in a file for ``--trusted-key``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.private, public, self.id = generate_key_pair()
        self.public = directory / f"{name}.pub"
        self.public.write_bytes(public)
        self.secret = b"".join(self.private.splitlines()[1:-1]).decode()  # the PEM's base64: must never show


def sign_with(monkeypatch, keys: Keys | None) -> None:
    """The Airflow side signs with ``keys`` (the private key in connection ``release_signing``), or not at all."""
    if keys is None:
        monkeypatch.delenv("INSPECTION_SIGNING_CONN_ID", raising=False)
        return
    monkeypatch.setenv("INSPECTION_SIGNING_CONN_ID", CONN_ID)
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}",
                       json.dumps({"conn_type": "generic", "password": keys.private.decode()}))


def publish_files(seed: int, name: str = "normal") -> str:
    """A small version of a CLIP index directory (the channel does not read the files), published as a run does."""
    publisher = compose.index_publisher()
    staging = publisher.stage(name)
    (staging / "images").mkdir()
    for i in range(3):
        (staging / "images" / f"{i}.jpg").write_bytes(b"\xff\xd8" + bytes([i]) * 500)  # unchanged between versions
    (staging / "faiss_index.bin").write_bytes(f"index {seed}".encode() * 100)
    (staging / "metadata.json").write_text(json.dumps({"seed": seed}))
    return publisher.publish(name, staging, new_version_id()).version


def trusting(*keys: Keys) -> list[str]:
    return [arg for k in keys for arg in ("--trusted-key", str(k.public))]


def refused_line(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # one line per refused version
    return errors[0]


def test_a_node_with_trusted_keys_installs_only_what_they_signed_and_rotation_adds_a_key(env, monkeypatch, caplog,
                                                                                          capsys):
    old, new = Keys(env.tmp, "old"), Keys(env.tmp, "new")
    node = env.tmp / "node"
    writes: list[str] = []
    call = botocore.client.BaseClient._make_api_call

    def recording(client, operation, params):  # every object written, in order, by anyone
        if operation in ("PutObject", "CopyObject"):
            writes.append(params["Key"])
        return call(client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
    caplog.set_level(logging.DEBUG)

    sign_with(monkeypatch, old)
    v1 = publish_files(seed=1)
    prefix = f"{PREFIX}clip/normal/{v1}/"
    signature = json.loads(get(env, prefix + SIGNATURE_NAME))
    manifest = get(env, prefix + MANIFEST_NAME)
    assert (signature["algorithm"], signature["key_id"]) == ("ed25519", old.id)
    assert signature["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    pointer_key = f"{PREFIX}clip/normal/current.json"
    order = [key for key in writes if key in (prefix + SIGNATURE_NAME, prefix + MANIFEST_NAME, pointer_key)]
    assert order[:3] == [prefix + SIGNATURE_NAME, prefix + MANIFEST_NAME, pointer_key], writes

    caplog.clear()
    assert pull(env, node, "--artefact", "clip:normal", *trusting(old)) == 0
    [line] = change_lines(caplog)
    assert line.startswith(f"clip:normal: none -> {v1}, ") and line.endswith(f", verified, signed by key {old.id}")
    assert tree(node / "clip_index" / "normal") == tree(compose.index_publisher().releases / "normal" / v1)

    # The key is rotated on the Airflow side before the nodes trust the new one: refused, v1 stays.
    sign_with(monkeypatch, new)
    v2 = publish_files(seed=2)
    caplog.clear()
    assert pull(env, node, "--artefact", "clip:normal", *trusting(old)) == 1
    line = refused_line(caplog)
    assert line.startswith(f"clip:normal: refused version {v2}: signed with key {new.id}, which this node does "
                           f"not trust (trusted: {old.id})") and line.endswith(f"version {v1} stays live"), line
    assert node_publisher(node).current("normal") == v1
    # The node is given both keys (rotation): v2 goes live.
    caplog.clear()
    assert pull(env, node, "--artefact", "clip:normal", *trusting(old, new)) == 0
    assert change_lines(caplog)[0].endswith(f"signed by key {new.id}")
    assert node_publisher(node).current("normal") == v2

    # Signing switched off: an unsigned version is refused where keys are trusted, installed where none are.
    sign_with(monkeypatch, None)
    v3 = publish_files(seed=3)
    caplog.clear()
    assert pull(env, node, "--artefact", "clip:normal", *trusting(old, new)) == 1
    assert refused_line(caplog).startswith(f"clip:normal: refused version {v3}: it is unsigned "
                                           f"(s3://{env.bucket}/{PREFIX}clip/normal/{v3}/{SIGNATURE_NAME} does not "
                                           "exist)")
    assert node_publisher(node).current("normal") == v2
    assert pull(env, env.tmp / "node-without-keys", "--artefact", "clip:normal") == 0  # as before signing
    assert node_publisher(env.tmp / "node-without-keys").current("normal") == v3

    # Neither private key showed anywhere: logs (every logger, DEBUG), output, the channel's objects.
    shown = "\n".join(r.getMessage() for r in caplog.records) + "".join(capsys.readouterr())
    shown += "".join(get(env, o.key).decode(errors="replace") for o in env.storage.list_objects(PREFIX)
                     if not o.key.endswith((".bin", ".jpg")))
    assert old.secret not in shown and new.secret not in shown


def test_a_rewritten_manifest_or_a_replayed_signature_is_refused(env, monkeypatch, caplog):
    keys = Keys(env.tmp, "signing")
    sign_with(monkeypatch, keys)
    node = env.tmp / "node"
    v1 = publish_files(seed=1)
    assert pull(env, node, "--artefact", "clip:normal", *trusting(keys)) == 0
    pointer_key = f"{PREFIX}clip/normal/current.json"

    def point_at(version: str, manifest: bytes) -> None:
        """What a bucket writer can do: objects, manifest and current.json, all consistent with each other."""
        pointer = json.loads(get(env, pointer_key))
        pointer.update(version=version, manifest_sha256=hashlib.sha256(manifest).hexdigest())
        put(env, pointer_key, json.dumps(pointer).encode())

    # A new version of one file, its manifest rewritten to match, the pointer moved: the signature no longer fits.
    v2 = publish_files(seed=2)
    prefix = f"{PREFIX}clip/normal/{v2}/"
    evil = b"evil index" * 100
    manifest = json.loads(get(env, prefix + MANIFEST_NAME))
    manifest["files"]["faiss_index.bin"].update(sha256=hashlib.sha256(evil).hexdigest(), size=len(evil))
    rewritten = json.dumps(manifest).encode()
    put(env, prefix + "faiss_index.bin", evil)
    put(env, prefix + MANIFEST_NAME, rewritten)
    point_at(v2, rewritten)
    caplog.clear()
    assert pull(env, node, "--artefact", "clip:normal", *trusting(keys)) == 1
    assert f"refused version {v2}: the signature of key {keys.id} does not match the manifest" in refused_line(caplog)
    assert pull(env, env.tmp / "unprotected", "--artefact", "clip:normal") == 0  # what signing protects against

    # v1's signed manifest and signature copied under a new version name: signed, but not for that version.
    v9 = new_version_id()
    for rel in (MANIFEST_NAME, SIGNATURE_NAME):
        put(env, f"{PREFIX}clip/normal/{v9}/{rel}", get(env, f"{PREFIX}clip/normal/{v1}/{rel}"))
    point_at(v9, get(env, f"{PREFIX}clip/normal/{v1}/{MANIFEST_NAME}"))
    caplog.clear()
    assert pull(env, node, "--artefact", "clip:normal", *trusting(keys)) == 1
    assert f"refused version {v9}: s3://{env.bucket}/{PREFIX}clip/normal/{v9}/{MANIFEST_NAME} is signed for " \
           f"clip:normal:{v1}" in refused_line(caplog)
    assert node_publisher(node).current("normal") == v1


def test_a_rollback_signs_a_version_published_before_signing_was_switched_on(env, monkeypatch, caplog):
    keys = Keys(env.tmp, "signing")
    v1 = publish_files(seed=1)  # unsigned
    sign_with(monkeypatch, keys)
    v2 = publish_files(seed=2)
    node = env.tmp / "node"
    assert pull(env, node, "--artefact", "clip:normal", *trusting(keys)) == 0
    assert node_publisher(node).current("normal") == v2

    # A kept copy that no longer matches the manifest cannot vouch for it: refused, nothing signed, nothing moved.
    kept = compose.index_publisher().releases / "normal" / v1 / "metadata.json"
    original = kept.read_bytes()
    kept.unlink()  # a new file: the other versions' hard links stay as they are
    kept.write_bytes(b'{"seed": 99}')
    with pytest.raises(PublishError, match=f"version {v1} of clip:normal has no valid signature, and the copy kept "
                                           "on this host cannot vouch for"):
        compose.index_publisher().rollback("normal", v1, pinned_by="test")
    assert json.loads(get(env, f"{PREFIX}clip/normal/current.json"))["version"] == v2
    kept.unlink()
    kept.write_bytes(original)

    compose.index_publisher().rollback("normal", v1, pinned_by="test")  # its kept copy vouches for the manifest
    assert json.loads(get(env, f"{PREFIX}clip/normal/{v1}/{SIGNATURE_NAME}"))["key_id"] == keys.id
    caplog.clear()
    assert pull(env, node, "--artefact", "clip:normal", *trusting(keys)) == 0
    assert node_publisher(node).current("normal") == v1
    assert change_lines(caplog)[0].endswith(f"signed by key {keys.id}")


def test_a_signing_key_that_cannot_sign_fails_the_publish_before_any_upload(env, monkeypatch):
    monkeypatch.setenv("INSPECTION_SIGNING_CONN_ID", CONN_ID)
    secret = "MC4CAQAwBQYDK2VwBCIEIKnotreallyakeybutsecretnonetheless000000000"
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({"conn_type": "generic", "password": secret}))
    with pytest.raises(PublishError) as caught:
        publish_files(seed=1)
    message = str(caught.value)
    assert f"Airflow connection '{CONN_ID}' (INSPECTION_SIGNING_CONN_ID) does not hold a PEM private key" in message
    assert "inspection-publish keygen" in message and secret not in message
    assert not list(env.storage.list_objects(PREFIX))  # nothing uploaded, nothing to clean up
    assert compose.index_publisher().current("normal") is None

    monkeypatch.setenv("INSPECTION_SIGNING_CONN_ID", "no_such_connection")
    with pytest.raises(PublishError, match="cannot read Airflow connection 'no_such_connection'"):
        publish_files(seed=1)


def test_a_manifest_path_that_leaves_the_version_directory_is_refused_naming_it(env, caplog):
    node = env.tmp / "node"
    v1 = publish_files(seed=1)
    assert pull(env, node, "--artefact", "clip:normal") == 0
    v2 = publish_files(seed=2)
    prefix = f"{PREFIX}clip/normal/{v2}/"
    payload = b"#!/bin/sh\necho owned\n"
    escape = "../../../../escape.sh"
    put(env, prefix + escape, payload)
    manifest = json.loads(get(env, prefix + MANIFEST_NAME))
    manifest["files"][escape] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    data = json.dumps(manifest).encode()
    put(env, prefix + MANIFEST_NAME, data)
    pointer = json.loads(get(env, f"{PREFIX}clip/normal/current.json"))
    pointer["manifest_sha256"] = hashlib.sha256(data).hexdigest()
    put(env, f"{PREFIX}clip/normal/current.json", json.dumps(pointer).encode())

    caplog.clear()
    assert pull(env, node, "--artefact", "clip:normal") == 1
    line = refused_line(caplog)
    assert f"s3://{env.bucket}/{prefix}{MANIFEST_NAME} names the path {escape!r}" in line, line
    assert line.endswith(f"version {v1} stays live")
    assert node_publisher(node).current("normal") == v1
    assert not [p for p in env.tmp.rglob("escape.sh")] and not os.path.exists("/escape.sh")
