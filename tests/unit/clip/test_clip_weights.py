"""Random checkpoints load through open_clip, are deterministic, are detectable; identities are stable."""

from __future__ import annotations

import json
import os

import pytest

from inspection_refresh.clip import weights
from inspection_refresh.clip.weights import (
    PREPROCESS_VERSION,
    create_random_checkpoint,
    file_sha256,
    is_random_checkpoint,
    model_identity,
    sidecar_path,
)


def test_random_checkpoint_loads_via_open_clip_and_matches_the_seed(clip_checkpoint):
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(clip_checkpoint))
    loaded = model.state_dict()
    torch.manual_seed(0)
    same_seed = open_clip.create_model("ViT-B-32", pretrained=None).state_dict()
    torch.manual_seed(1)
    other_seed = open_clip.create_model("ViT-B-32", pretrained=None).state_dict()
    assert loaded.keys() == same_seed.keys()
    assert all(torch.equal(loaded[k], same_seed[k]) for k in loaded)
    assert not torch.equal(loaded["visual.conv1.weight"], other_seed["visual.conv1.weight"])


def test_same_seed_writes_the_same_file(clip_checkpoint, tmp_path):
    again = create_random_checkpoint(tmp_path / "again.pt", "ViT-B-32", seed=0)
    assert file_sha256(again) == file_sha256(clip_checkpoint)
    assert not list(tmp_path.glob("*.tmp")), "temporary files are renamed or removed"
    assert oct(again.stat().st_mode & 0o777) != oct(0o600), "not left with mkstemp's private mode"


def test_random_checkpoint_is_detected_by_sidecar_and_by_inner_marker(clip_checkpoint, tmp_path):
    assert is_random_checkpoint(clip_checkpoint)
    side = json.loads(sidecar_path(clip_checkpoint).read_text())
    assert side["inspection_random_init"] is True and side["seed"] == 0
    linked = tmp_path / "no_sidecar.pt"  # same bytes, no sidecar: the marker inside is read (mmap)
    os.link(clip_checkpoint, linked)
    assert not sidecar_path(linked).exists()
    assert is_random_checkpoint(linked)


def test_other_weights_are_not_random(tmp_path):
    import torch

    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    assert not is_random_checkpoint(plain)
    assert not is_random_checkpoint("openai")
    assert not is_random_checkpoint(tmp_path / "missing.pt")
    assert not is_random_checkpoint(None)


def test_identity_of_a_tag_and_of_a_file(tmp_path):
    ident = model_identity("ViT-B-32", "openai")
    assert ident.startswith("ViT-B-32/openai|") and ident.endswith(PREPROCESS_VERSION)

    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"first version")
    first = model_identity("ViT-B-32", str(ckpt))
    assert "sha256:" + file_sha256(ckpt) in first
    assert model_identity("ViT-B-32", str(ckpt)) == first
    ckpt.write_bytes(b"second version, other size")
    assert model_identity("ViT-B-32", str(ckpt)) != first
    assert model_identity("ViT-B-16", "openai") != ident


def test_file_hash_is_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"x" * 1000)
    digest = file_sha256(ckpt)
    assert json.loads(sidecar_path(ckpt).read_text())["sha256"] == digest
    weights._SHA_MEMO.clear()  # a new process: the sidecar answers, the file is not re-read

    def no_reading(*args, **kwargs):
        raise AssertionError("file was hashed again")

    monkeypatch.setattr(weights.hashlib, "sha256", no_reading)
    assert file_sha256(ckpt) == digest


def test_unknown_weights_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        model_identity("ViT-B-32", str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="neither an open_clip weights tag"):
        model_identity("ViT-B-32", "no-such-tag")


def test_load_model_offline_names_the_tag_and_the_remedy(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from inspection_refresh.clip.embed import CLIPWeightsError, load_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CLIPWeightsError) as err:
        load_model("ViT-B-32", "openai", device="cpu")
    message = str(err.value)
    assert "'openai'" in message and "INSPECTION_CLIP_PRETRAINED" in message

    with pytest.raises(CLIPWeightsError, match="nope.pt"):
        load_model("ViT-B-32", str(tmp_path / "nope.pt"), device="cpu")
