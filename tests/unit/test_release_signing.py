"""Release manifests a serving host can trust: paths that cannot leave the version directory, Ed25519
signatures (sign, verify, key rotation, keys that never show), ``keygen``, and the agent's one-line message
when the host lacks boto3."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from inspection_refresh.cli import main
from inspection_refresh.manifests import ChannelError, parse_manifest, verify_directory
from inspection_refresh.signing import ManifestSigner, SignatureError, TrustedKeys, generate_key_pair

REPO = Path(__file__).resolve().parents[2]
SHA = hashlib.sha256(b"x").hexdigest()


def manifest_with(*paths: str) -> bytes:
    return json.dumps({"files": {path: {"sha256": SHA, "size": 1} for path in paths}}).encode()


@pytest.mark.parametrize("path", ["../escape.txt", "images/../../escape.txt", "/etc/cron.d/x", "images\\..\\x",
                                  "images//x.jpg", "./x", "images/.", "C:x", "x\x00y", ""])
def test_a_manifest_path_that_escapes_the_version_directory_is_refused_naming_it(path):
    where = "s3://bucket/deployments/clip/normal/v1/.release-manifest.json"
    with pytest.raises(ChannelError) as caught:
        parse_manifest(manifest_with("faiss_index.bin", path), where)
    assert where in str(caught.value) and repr(path) in str(caught.value)
    assert "escapes the version directory" in str(caught.value)


def test_safe_nested_paths_are_kept_and_a_hand_made_manifest_is_still_checked(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"x")
    manifest = parse_manifest(manifest_with("images/a.jpg"), "here")
    assert verify_directory(tmp_path, manifest, str) == []
    # verify_directory never joins an unchecked path, even given a manifest that skipped parse_manifest
    outside = tmp_path.parent / "outside.txt"
    outside.write_bytes(b"x")
    problems = verify_directory(tmp_path, {"files": {"../outside.txt": {"sha256": SHA, "size": 1},
                                                     "images/a.jpg": {"sha256": SHA, "size": 1}}}, str)
    assert problems == ["../outside.txt is outside the version directory"]


def signer_of(private: bytes) -> ManifestSigner:
    return ManifestSigner(lambda: private.decode(), "Airflow connection 'release_signing'")


def trusted(tmp_path: Path, *publics: bytes) -> TrustedKeys:
    paths = []
    for i, public in enumerate(publics):
        paths.append(tmp_path / f"key{i}.pub")
        paths[-1].write_bytes(public)
    return TrustedKeys.from_files(paths)


def test_signatures_verify_with_a_trusted_key_and_rotation_accepts_either(tmp_path):
    old_private, old_public, old_id = generate_key_pair()
    new_private, new_public, new_id = generate_key_pair()
    manifest = manifest_with("faiss_index.bin")
    by_old, by_new = signer_of(old_private).sign(manifest), signer_of(new_private).sign(manifest)
    assert json.loads(by_new)["key_id"] == new_id == signer_of(new_private).key_id

    only_old = trusted(tmp_path, old_public)
    assert only_old.verify(manifest, by_old) == old_id
    with pytest.raises(SignatureError, match=f"signed with key {new_id}, which this node does not trust"):
        only_old.verify(manifest, by_new)
    rotated = trusted(tmp_path, old_public, new_public)  # two --trusted-key during a rotation
    assert rotated.verify(manifest, by_old) == old_id and rotated.verify(manifest, by_new) == new_id

    with pytest.raises(SignatureError, match="does not match the manifest"):
        rotated.verify(manifest.replace(b'"size": 1', b'"size": 2'), by_new)
    forged = json.loads(by_new)
    forged["key_id"] = old_id  # another key's id on this signature
    with pytest.raises(SignatureError, match="does not match the manifest"):
        rotated.verify(manifest, json.dumps(forged).encode())
    with pytest.raises(SignatureError, match="not a valid signature document"):
        rotated.verify(manifest, b"not json")


def test_keys_never_show_in_reprs_or_messages(tmp_path):
    private, public, _ = generate_key_pair()
    body = b"".join(private.splitlines()[1:-1]).decode()  # the base64 of the key, without the PEM lines
    signer = signer_of(private)
    signature = signer.sign(b"{}")
    assert body not in repr(signer) and body not in signature.decode()
    wrong = ManifestSigner(lambda: private.decode().replace("PRIVATE KEY", "PUBLIC KEY"), "connection 'x'")
    with pytest.raises(SignatureError) as caught:
        wrong.sign(b"{}")
    assert "connection 'x' does not hold a PEM private key" in str(caught.value)
    assert body not in str(caught.value) and caught.value.__suppress_context__  # no chained error quoting it
    path = tmp_path / "private.pem"
    path.write_bytes(private)
    with pytest.raises(SignatureError, match="is not a PEM public key") as caught:
        TrustedKeys.from_files([path])  # a private key given as a trusted key
    assert body not in str(caught.value)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites_one(tmp_path, capsys):
    out = tmp_path / "keys"
    assert main(["keygen", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    private, public = out / "release-signing.key", out / "release-signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    kid = TrustedKeys.from_files([public]).verify(b"m", ManifestSigner(private.read_bytes, "file").sign(b"m"))
    assert printed.startswith(f"key {kid}\n") and "--trusted-key" in printed and "INSPECTION_SIGNING_CONN_ID" in printed
    assert b"".join(private.read_bytes().splitlines()[1:-1]).decode() not in printed
    before = private.read_bytes()
    assert main(["keygen", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and private.read_bytes() == before


@pytest.mark.parametrize(("hidden", "args", "needs"), [
    ("boto3", [], "boto3"),
    ("cryptography", ["--trusted-key", "k.pub"], "cryptography"),
])
def test_without_its_packages_the_agent_says_what_to_install_in_one_line(tmp_path, hidden, args, needs):
    # sys.modules[name] = None makes "import name" fail as if the package were not installed.
    code = (f"import sys; sys.modules[{hidden!r}] = None; from inspection_refresh.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "pull", "--bucket", "b", "--index-root", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO / "include")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f'inspection-publish pull needs {needs}: pip install "inspection-refresh[agent]"'], done.stderr
    assert done.stdout == ""
