"""CLIP weights: say which weights embeddings come from, and make random ones for tests.

``pretrained`` is what open_clip takes: a tag such as ``openai`` (looked up in the
hub cache, downloaded when online) or the path of a checkpoint file. Tags win
over paths, exactly as in :func:`open_clip.create_model`.

:func:`model_identity` turns (model name, pretrained) into a stable string used as
the embedding-cache key and written into every index manifest; a file's identity
carries the sha256 of its bytes, so replacing the file invalidates the cache.

:func:`create_random_checkpoint` writes randomly initialised weights that load
with ``open_clip.create_model_and_transforms(model_name, pretrained=<path>)``;
tests and the demo use it because no real weights can be downloaded there. Such
a file is marked inside (``"inspection_random_init": True`` beside
``"state_dict"``) and by a sidecar ``<file>.json``, so :func:`is_random_checkpoint`
can tell callers to say plainly that the embeddings are meaningless.

Importing this module is cheap: torch and open_clip are imported inside the
functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path

from inspection_refresh.files import atomic_write, write_json_atomic

log = logging.getLogger(__name__)

PREPROCESS_VERSION = "rgb-squash224-bilinear-clipnorm-v1"
"""Names the preprocessing in :mod:`inspection_refresh.clip.preprocess`; bump it whenever
that changes so that cached embeddings are not reused."""

RANDOM_MARKER_KEY = "inspection_random_init"
"""Key stored beside ``state_dict`` in checkpoints made by :func:`create_random_checkpoint`."""

SIDECAR_SUFFIX = ".json"

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")

# (path, size, mtime_ns) -> sha256 hex; saves re-hashing a ~600 MB file in one process.
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def sidecar_path(checkpoint: str | os.PathLike[str]) -> Path:
    """``/x/model.pt`` -> ``/x/model.pt.json``: facts about a checkpoint kept beside it."""
    p = Path(checkpoint)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def _atomic_write_bytes(path: Path, write) -> None:
    atomic_write(path, write, fsync=False)


def _write_json_atomic(path: Path, data: dict) -> None:
    write_json_atomic(path, data, fsync=False)


def _read_sidecar(checkpoint: Path) -> dict:
    try:
        data = json.loads(sidecar_path(checkpoint).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, remembered by (path, size, mtime).

    The digest is kept in memory for this process and in the checkpoint's sidecar
    ``<file>.json`` (when that directory is writable), so a task does not re-hash
    an unchanged ~600 MB checkpoint on every run.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    side = _read_sidecar(p)
    if side.get("sha256") and side.get("size") == st.st_size and side.get("mtime_ns") == st.st_mtime_ns:
        _SHA_MEMO[key] = side["sha256"]
        return side["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    digest = h.hexdigest()
    _SHA_MEMO[key] = digest
    side.update({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    try:
        _write_json_atomic(sidecar_path(p), side)
    except OSError as exc:  # read-only model directory: memory only
        log.debug("could not record sha256 beside %s: %s", p, exc)
    return digest


def _open_clip_version() -> str:
    try:
        return metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:  # pragma: no cover - always installed here
        return "unknown"


def is_pretrained_tag(model_name: str, pretrained: str) -> bool:
    """True when open_clip knows ``pretrained`` as a weights tag for ``model_name``."""
    from open_clip.pretrained import get_pretrained_cfg  # imports torch via open_clip

    return bool(get_pretrained_cfg(model_name.replace("/", "-"), pretrained))


def resolve_pretrained(model_name: str, pretrained: str) -> tuple[str, Path | None]:
    """Classify ``pretrained`` the way open_clip does: ``("tag", None)`` or ``("file", path)``.

    Raises ``ValueError`` when it is neither a tag open_clip knows for this model
    nor an existing file.
    """
    if not pretrained:
        raise ValueError(f"no pretrained weights given for {model_name}: pass a tag such as 'openai' or a checkpoint path")
    looks_like_path = os.sep in pretrained or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES)
    if not looks_like_path and is_pretrained_tag(model_name, pretrained):
        return "tag", None
    p = Path(pretrained).expanduser()
    if p.is_file():
        return "file", p.resolve()
    if looks_like_path:
        raise ValueError(f"CLIP checkpoint file {p} does not exist (model {model_name})")
    raise ValueError(
        f"{pretrained!r} is neither an open_clip weights tag for {model_name} nor an existing checkpoint file"
    )


def model_identity(model_name: str, pretrained: str) -> str:
    """Stable name of the weights + preprocessing; the embedding-cache key.

    ``("ViT-B-32", "openai")`` -> ``"ViT-B-32/openai|open_clip-3.3.0|rgb-squash224-bilinear-clipnorm-v1"``;
    a checkpoint file gives ``"ViT-B-32/file:<name>@sha256:<hex>|..."``. The
    open_clip version is included because open_clip has changed how a given
    (model, tag) is built before (QuickGELU for ``openai``), which changes vectors.
    """
    kind, path = resolve_pretrained(model_name, pretrained)
    if kind == "tag":
        weights = pretrained
    else:
        assert path is not None
        weights = f"file:{path.name}@sha256:{file_sha256(path)}"
    return f"{model_name}/{weights}|open_clip-{_open_clip_version()}|{PREPROCESS_VERSION}"


def _torch_save_stable(obj, path: Path) -> None:
    """``torch.save`` through a file object: the archive is then named ``archive`` rather
    than after the (temporary) file name, so equal content gives equal bytes."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)


def create_random_checkpoint(path: str | os.PathLike[str], model_name: str = "ViT-B-32", seed: int = 0) -> Path:
    """Write a randomly initialised open_clip checkpoint for ``model_name`` to ``path``.

    The same ``seed`` gives the same weights (on the same torch version). The
    file is a ``torch.save`` of ``{"state_dict": ..., "inspection_random_init": True,
    "model_name": ..., "seed": ...}``, which open_clip loads as
    ``create_model_and_transforms(model_name, pretrained=str(path))``; a sidecar
    ``<path>.json`` repeats the marker and records the file's sha256. Both are
    written to a temporary name and renamed, so a reader never sees half a file.
    Returns the absolute path.
    """
    import open_clip
    import torch

    out = Path(path).expanduser().resolve()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "state_dict": state,
        RANDOM_MARKER_KEY: True,
        "model_name": model_name,
        "seed": int(seed),
    }
    _atomic_write_bytes(out, lambda tmp: _torch_save_stable(payload, tmp))
    st = out.stat()
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    _SHA_MEMO[(str(out), st.st_size, st.st_mtime_ns)] = digest
    _write_json_atomic(
        sidecar_path(out),
        {
            RANDOM_MARKER_KEY: True,
            "model_name": model_name,
            "seed": int(seed),
            "sha256": digest,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "note": "RANDOM weights for tests/demo: embeddings from this file carry no meaning",
        },
    )
    log.info("wrote RANDOM-init %s checkpoint (seed %d) to %s (%.0f MB)", model_name, seed, out, st.st_size / 1e6)
    return out


def is_random_checkpoint(pretrained: str | os.PathLike[str] | None) -> bool:
    """True when ``pretrained`` is a file written by :func:`create_random_checkpoint`.

    Reads the sidecar ``<file>.json`` when present; otherwise looks for the marker
    inside the checkpoint (memory-mapped, so the weights are not read). A tag or
    a missing file is never random.
    """
    if not pretrained:
        return False
    p = Path(pretrained).expanduser()
    if not p.is_file():
        return False
    side = _read_sidecar(p)
    st = p.stat()
    if RANDOM_MARKER_KEY in side and side.get("size") == st.st_size and side.get("mtime_ns") == st.st_mtime_ns:
        return bool(side[RANDOM_MARKER_KEY])
    if p.suffix in (".safetensors", ".npz", ".npy"):
        return False
    import torch

    try:
        ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not a zip checkpoint we can map: not one of ours
        return False
    return isinstance(ckpt, dict) and bool(ckpt.get(RANDOM_MARKER_KEY, False))
