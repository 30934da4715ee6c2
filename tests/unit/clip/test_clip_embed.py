"""Gallery embedding: the service's preprocessing, batched == single, skipped files, the cache."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from inspection_refresh.clip import embed
from inspection_refresh.clip.batched import _collate, _ResizeDataset
from inspection_refresh.clip.cache import EmbeddingCache
from inspection_refresh.clip.embed import embed_files, embed_image
from inspection_refresh.clip.preprocess import CLIP_MEAN, CLIP_STD, normalize_uint8, preprocess_image


def torchvision_reference(path):
    """The service's query preprocessing written independently with torchvision."""
    from PIL import Image
    from torchvision import transforms

    pipeline = transforms.Compose([
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    return pipeline(Image.open(path).convert("RGB"))


def test_preprocessing_matches_torchvision(image_paths):
    for path in image_paths:  # RGB JPEG, RGBA, grayscale and palette PNGs
        ours = preprocess_image(path)
        ref = torchvision_reference(path)
        assert ours.shape == (3, 224, 224) and ours.dtype == ref.dtype
        assert float((ours - ref).abs().max()) < 1e-6, path.name


def test_batched_preprocessing_is_bit_identical_to_single(image_paths):
    import torch

    items = list(enumerate(str(p) for p in image_paths))
    rows, batch, failed = _collate([_ResizeDataset(items)[i] for i in range(len(items))])
    assert rows == list(range(len(items))) and not failed
    assert torch.equal(normalize_uint8(batch), torch.stack([preprocess_image(p) for p in image_paths]))


def test_embeddings_are_unit_float32_and_match_the_single_image_path(clip_model, image_paths):
    result = embed_files(image_paths, clip_model, batch_size=3, num_workers=1)
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (len(image_paths), clip_model.embed_dim)
    assert result.ok_indices == list(range(len(image_paths))) and not result.failures
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    singles = np.stack([embed_image(p, clip_model) for p in image_paths])
    np.testing.assert_allclose(result.vectors, singles, atol=1e-5)
    assert result.embedded == len(image_paths) and result.cached == 0
    assert result.images_per_second > 0
    assert result.summary()["embedding_dim"] == clip_model.embed_dim


def test_unreadable_files_are_reported_and_the_rest_embedded(clip_model, image_paths, tmp_path, caplog):
    good = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    shutil.copy(image_paths[0], good[0])
    shutil.copy(image_paths[1], good[1])
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(image_paths[2].read_bytes()[:600])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is a text file renamed to .jpg\n")
    missing = tmp_path / "missing.jpg"
    paths = [truncated, good[0], empty, text, good[1], missing]

    result = embed_files(paths, clip_model, batch_size=2, num_workers=1)
    assert result.ok_indices == [1, 4]
    assert result.vectors.shape == (2, clip_model.embed_dim)
    reasons = dict(result.failures)
    assert sorted(reasons) == [0, 2, 3, 5]
    assert "corrupt or truncated" in reasons[0]
    assert "empty" in reasons[2]
    assert "not an image" in reasons[3]
    assert "cannot read" in reasons[5]
    for path in (truncated, empty, text, missing):  # one log line per skipped file
        assert sum(str(path) in r.getMessage() for r in caplog.records) == 1


def test_cache_rerun_add_one_and_identity_change(clip_model, image_paths, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path / "cache")
    first = embed_files(image_paths[:4], clip_model, batch_size=2, cache=cache, num_workers=0)
    assert (first.embedded, first.cached) == (4, 0)

    def no_decoding(path):
        raise AssertionError(f"cached image {path} was decoded")

    monkeypatch.setattr(embed, "load_resized", no_decoding)  # num_workers=0 decodes in this process
    again = embed_files(image_paths[:4], clip_model, batch_size=2, cache=cache, num_workers=0)
    assert (again.embedded, again.cached) == (0, 4)
    np.testing.assert_array_equal(again.vectors, first.vectors)
    monkeypatch.undo()

    more = embed_files(image_paths[:5], clip_model, batch_size=2, cache=cache, num_workers=0)
    assert (more.embedded, more.cached) == (1, 4)

    other = dataclasses.replace(clip_model, identity=clip_model.identity + "|other-weights")
    changed = embed_files(image_paths[:5], other, batch_size=2, cache=cache, num_workers=0)
    assert (changed.embedded, changed.cached) == (5, 0)

    rebuilt = embed_files(image_paths[:5], clip_model, batch_size=2, cache=cache, full_rebuild=True, num_workers=0)
    assert (rebuilt.embedded, rebuilt.cached) == (5, 0)
    assert cache.count(clip_model.identity) == 5


def test_identical_files_are_embedded_once(clip_model, image_paths, tmp_path):
    copy = tmp_path / "copy_of_first.jpg"
    shutil.copy(image_paths[0], copy)
    result = embed_files([image_paths[0], image_paths[1], copy], clip_model, num_workers=0)
    assert result.embedded == 2 and result.ok_indices == [0, 1, 2]
    np.testing.assert_array_equal(result.vectors[0], result.vectors[2])


def test_cache_survives_a_corrupt_or_missing_file(tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    with EmbeddingCache(cache_dir) as cache:
        cache.put_many("model-a", [("abc", np.ones(4, np.float32))])
        assert set(cache.get_many("model-a", ["abc", "def"])) == {"abc"}
        assert cache.get_many("model-b", ["abc"]) == {}
    (cache_dir / "embeddings.sqlite3").write_bytes(b"this is not a database" * 100)
    for side in ("-wal", "-shm"):
        (cache_dir / ("embeddings.sqlite3" + side)).unlink(missing_ok=True)
    with EmbeddingCache(cache_dir) as cache:
        assert cache.get_many("model-a", ["abc"]) == {}
        cache.put_many("model-a", [("abc", np.ones(4, np.float32))])
        assert cache.count() == 1
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert list(cache_dir.glob("embeddings.sqlite3.corrupt-*"))
    with EmbeddingCache(tmp_path / "new" / "dir") as fresh:
        assert fresh.count() == 0


def test_nothing_to_embed_returns_an_empty_matrix(clip_model, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result = embed_files([empty], clip_model)
    assert result.vectors.shape == (0, clip_model.embed_dim)
    assert result.ok_indices == [] and len(result.failures) == 1


@pytest.mark.parametrize("device", ["gpu", "tpu"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ValueError):
        embed.resolve_device(device)


def test_lazy_model_is_not_loaded_when_everything_is_cached(clip_checkpoint, clip_model, image_paths, tmp_path):
    from inspection_refresh.clip.embed import load_model

    cache = EmbeddingCache(tmp_path / "cache")
    warm = embed_files(image_paths[:2], clip_model, cache=cache, num_workers=0)
    lazy = load_model("ViT-B-32", str(clip_checkpoint), device="cpu", lazy=True)
    assert lazy.identity == clip_model.identity and lazy.embed_dim == 512 and lazy.random_init
    again = embed_files(image_paths[:2], lazy, cache=cache, num_workers=0)
    assert again.embedded == 0 and not lazy.loaded
    np.testing.assert_array_equal(again.vectors, warm.vectors)
    more = embed_files(image_paths[:3], lazy, cache=cache, num_workers=0)
    assert more.embedded == 1 and lazy.loaded


def test_the_log_states_the_preprocessing_used_after_open_clips_own(clip_checkpoint, caplog):
    """open_clip logs the transform it builds (bicubic, shortest side); the next line must say what is used."""
    import logging

    from inspection_refresh.clip.embed import load_model

    with caplog.at_level(logging.INFO):
        load_model("ViT-B-32", str(clip_checkpoint), device="cpu")
    messages = [r.getMessage() for r in caplog.records]
    open_clips = next(i for i, m in enumerate(messages) if "preprocessing configuration" in m)
    assert "bicubic" in messages[open_clips] and "shortest" in messages[open_clips]
    ours = next(i for i, m in enumerate(messages) if m.startswith("CLIP preprocessing used"))
    assert ours > open_clips
    assert ("RGB, 224x224 bilinear squash" in messages[ours] and "CLIP mean (0.4815, 0.4578, 0.4082)" in messages[ours]
            and "L2-normalised" in messages[ours])


def test_first_batch_is_small_and_batches_cover_everything():
    assert embed._batches(0, 32) == []
    assert [len(b) for b in embed._batches(100, 32)] == [8, 32, 32, 28]
    assert sum(embed._batches(100, 32), []) == list(range(100))
    assert embed._batches(5, 2) == [[0, 1], [2, 3], [4]]
    two_lanes = [len(b) for b in embed._batches(650, 32, lanes=2)]
    assert two_lanes == [8, 8] + [32] * 18 + [29, 29] and sum(two_lanes) == 650
    assert [len(b) for b in embed._batches(100, 32, lanes=2)] == [8, 8, 42, 42]
    assert [len(b) for b in embed._batches(3, 32, lanes=4)] == [3]


def test_lanes_and_workers_give_the_same_vectors(clip_model, image_paths):
    reference = embed_files(image_paths, clip_model, batch_size=3, num_workers=0, lanes=1)
    for workers, lanes in ((0, 2), (1, 2), (2, 1)):
        other = embed_files(image_paths, clip_model, batch_size=3, num_workers=workers, lanes=lanes)
        assert other.ok_indices == reference.ok_indices
        np.testing.assert_allclose(other.vectors, reference.vectors, atol=1e-5)


def _embed_in_a_daemonic_process(checkpoint: str, paths: list[str], results) -> None:
    try:
        model = embed.load_model("ViT-B-32", checkpoint, device="cpu")
        result = embed_files(paths, model, batch_size=3, num_workers=1, lanes=1)
        results.put(("ok", result.vectors))
    except BaseException as exc:  # reported by the test
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def test_a_daemonic_process_decodes_itself(clip_checkpoint, clip_model, image_paths):
    """An Airflow task run by a Celery prefork worker is daemonic: no DataLoader worker processes there."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_embed_in_a_daemonic_process, daemon=True,
                            args=(str(clip_checkpoint), [str(p) for p in image_paths], results))
    child.start()
    status, value = results.get(timeout=300)
    child.join(60)
    assert status == "ok", value
    reference = embed_files(image_paths, clip_model, batch_size=3, num_workers=0, lanes=1)
    np.testing.assert_allclose(value, reference.vectors, atol=1e-5)
