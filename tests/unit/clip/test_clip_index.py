"""Index files in the service's formats: written, reloaded as the service does, verified, searched."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inspection_refresh.clip.index import (
    METADATA_KEYS,
    IndexVerificationError,
    _torch_save_stable,
    search,
    verify_index,
    write_index_files,
)


def records(n: int) -> list[dict]:
    return [
        {
            "image_id": i + 1,
            "local_path": f"/data/images/normal/3/P01_{i:03d}.jpg",
            "storage_url": f"images/normal/3/P01_{i:03d}.jpg",
            "product_id": 3,
            "product_code": "P01",
            "product_name": "bracket",
            "defect_type_id": None,
            "defect_code": None,
            "defect_name": None,
            "image_type": "normal",
            "file_name": f"P01_{i:03d}.jpg",
        }
        for i in range(n)
    ]


def random_unit(n: int, d: int = 512, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write(tmp_path, vectors, **extra):
    n = len(vectors)
    paths = [r["local_path"] for r in records(n)]
    return write_index_files(
        tmp_path / "normal", vectors, paths, records(n),
        index_type="normal", model_id="ViT-B-32", pretrained="openai",
        manifest_extra={"run_id": "manual__1", "source_prefix": "images/normal/", **extra},
    )


def test_round_trip_in_the_service_formats(tmp_path):
    import faiss
    import torch

    vectors = random_unit(20)
    vectors[7] = vectors[3]  # an exact duplicate image: a tie, accepted
    manifest = write(tmp_path, vectors * 3.0)  # rows are re-normalised on write
    out = tmp_path / "normal"
    assert manifest["count"] == 20 and manifest["dim"] == 512 and manifest["run_id"] == "manual__1"
    assert set(manifest["files"]) == {"faiss_index.bin", "index_data.pt", "embeddings.pt", "metadata.json"}
    assert json.loads((out / "manifest.json").read_text()) == manifest

    index = faiss.read_index(str(out / "faiss_index.bin"))
    assert isinstance(faiss.downcast_index(index), faiss.IndexFlatIP) and index.ntotal == 20
    data = torch.load(out / "index_data.pt")  # the service's plain torch.load
    assert set(data) == {"gallery_paths", "gallery_embs", "model_id", "pretrained"}
    assert data["gallery_embs"].dtype == torch.float32 and data["gallery_embs"].shape == (20, 512)
    assert (data["model_id"], data["pretrained"]) == ("ViT-B-32", "openai")
    embs = torch.load(out / "embeddings.pt")
    assert torch.equal(embs, data["gallery_embs"])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["index_type"] == "normal" and meta["num_images"] == 20
    assert [set(r) for r in meta["metadata"]] == [set(METADATA_KEYS)] * 20
    np.testing.assert_allclose(embs.numpy(), vectors, atol=1e-6)

    summary = verify_index(out)
    assert summary["count"] == 20 and summary["dim"] == 512 and summary["self_top1"] + summary["ties"] == 20
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_same_inputs_give_the_same_files(tmp_path):
    vectors = random_unit(5)
    first = write(tmp_path / "a", vectors)["files"]
    second = write(tmp_path / "b", vectors)["files"]
    assert first == second


def test_search_finds_each_gallery_image_first(tmp_path):
    vectors = random_unit(30, seed=1)
    write(tmp_path, vectors)
    hits = search(tmp_path / "normal", vectors[[4, 17]], k=3)
    assert [h[0].path for h in hits] == [records(30)[4]["local_path"], records(30)[17]["local_path"]]
    assert hits[0][0].row == 4 and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert len(hits[0]) == 3 and hits[0][0].score >= hits[0][1].score >= hits[0][2].score


def test_search_on_real_embeddings_returns_the_image_itself(clip_model, image_paths, tmp_path):
    from inspection_refresh.clip.embed import embed_files, embed_image

    result = embed_files(image_paths, clip_model, num_workers=0)
    paths = [str(image_paths[i]) for i in result.ok_indices]
    metas = [dict(r, local_path=p) for r, p in zip(records(len(paths)), paths)]
    write_index_files(tmp_path / "idx", result.vectors, paths, metas, index_type="normal",
                      model_id="ViT-B-32", pretrained="random", manifest_extra={})
    verify_index(tmp_path / "idx")
    for path in image_paths[:3]:
        top = search(tmp_path / "idx", embed_image(path, clip_model), k=1)[0][0]
        assert top.path == str(path)


def test_tampering_is_detected_by_sha256(tmp_path):
    write(tmp_path, random_unit(6))
    meta_path = tmp_path / "normal" / "metadata.json"
    meta_path.write_text(meta_path.read_text().replace("bracket", "brackey"))
    with pytest.raises(IndexVerificationError) as err:
        verify_index(tmp_path / "normal")
    assert err.value.file.endswith("metadata.json") and "sha256" in err.value.problem


def _rewrite_with_manifest(out, name, writer):
    writer(str(out / name))
    manifest = json.loads((out / "manifest.json").read_text())
    import hashlib

    manifest["files"][name]["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_dimension_mismatch_is_detected(tmp_path):
    import torch

    write(tmp_path, random_unit(6))
    out = tmp_path / "normal"
    _rewrite_with_manifest(out, "embeddings.pt", lambda p: _torch_save_stable(torch.zeros(6, 256), p))
    with pytest.raises(IndexVerificationError, match=r"embeddings.pt: .*shape \(6, 256\).*\(6, 512\)"):
        verify_index(out)


def test_a_vector_that_does_not_find_itself_is_detected(tmp_path):
    import faiss

    vectors = random_unit(6)
    write(tmp_path, vectors)
    out = tmp_path / "normal"
    swapped = vectors[[1, 0, 2, 3, 4, 5]]  # faiss rows no longer match the paths
    index = faiss.IndexFlatIP(512)
    index.add(swapped)
    _rewrite_with_manifest(out, "faiss_index.bin", lambda p: faiss.write_index(index, p))
    with pytest.raises(IndexVerificationError, match="faiss_index.bin"):
        verify_index(out)


def test_missing_files_and_bad_inputs(tmp_path):
    write(tmp_path, random_unit(4))
    (tmp_path / "normal" / "index_data.pt").unlink()
    with pytest.raises(IndexVerificationError, match="index_data.pt: missing"):
        verify_index(tmp_path / "normal")
    with pytest.raises(IndexVerificationError, match="manifest.json: missing"):
        verify_index(tmp_path)

    ok = records(3)
    with pytest.raises(ValueError, match="3 vectors but 2 gallery paths"):
        write_index_files(tmp_path / "x", random_unit(3), ["a", "b"], ok, index_type="normal",
                          model_id="m", pretrained="p")
    bad = [dict(r) for r in ok]
    del bad[1]["storage_url"]
    with pytest.raises(ValueError, match="record 1 .* lacks keys \\['storage_url'\\]"):
        write_index_files(tmp_path / "x", random_unit(3), ["a", "b", "c"], bad, index_type="normal",
                          model_id="m", pretrained="p")
    with pytest.raises(ValueError, match="empty index"):
        write_index_files(tmp_path / "x", np.zeros((0, 512), np.float32), [], [], index_type="normal",
                          model_id="m", pretrained="p")
    with pytest.raises(ValueError, match="override"):
        write_index_files(tmp_path / "x", random_unit(3), ["a", "b", "c"], ok, index_type="normal",
                          model_id="m", pretrained="p", manifest_extra={"count": 5})
