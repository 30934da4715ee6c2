"""Write, verify and query one CLIP index directory in the service's formats (CONTRACT.md).

One directory per index type (``normal``, ``defect``) holds:

- ``faiss_index.bin``: ``faiss.write_index`` of an ``IndexFlatIP`` over the
  L2-normalised float32 vectors (row i = image i);
- ``index_data.pt`` (older loader): ``{"gallery_paths", "gallery_embs", "model_id", "pretrained"}``;
- ``embeddings.pt`` (``FloatTensor[N, D]``) + ``metadata.json`` (newer loader);
- ``manifest.json`` (ours): model, count, dim, sha256 and size of every other
  file, plus what the caller adds (source prefix, run id, weights identity...).

Every file is written to a temporary name in the same directory and renamed,
and the manifest goes last, so a reader never sees half a file; making the
directory as a whole appear at once is the publisher's job.
:func:`verify_index` reloads everything the way the service does before a
directory is published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

from inspection_refresh.files import atomic_write, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

log = logging.getLogger(__name__)

FAISS_FILE = "faiss_index.bin"
INDEX_DATA_FILE = "index_data.pt"
EMBEDDINGS_FILE = "embeddings.pt"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"
SERVICE_FILES = (FAISS_FILE, INDEX_DATA_FILE, EMBEDDINGS_FILE, METADATA_FILE)
MANIFEST_FORMAT = 1

METADATA_KEYS = (
    "image_id",
    "local_path",
    "storage_url",
    "product_id",
    "product_code",
    "product_name",
    "defect_type_id",
    "defect_code",
    "defect_name",
    "image_type",
    "file_name",
)
"""Keys of each ``metadata.json`` record, as the service's newer loader reads them."""

NORM_TOLERANCE = 1e-3
TIE_TOLERANCE = 1e-5


class IndexVerificationError(Exception):
    """An index directory is not what the service expects; ``file`` names the culprit."""

    def __init__(self, file: str | os.PathLike[str], problem: str) -> None:
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")


class Hit(NamedTuple):
    """One search result: FAISS row, gallery path of that row, cosine score."""

    row: int
    path: str
    score: float


# ----------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    atomic_write(path, lambda tmp: write(str(tmp)))


def _write_json(path: Path, data: Any) -> None:
    write_json_atomic(path, data)


def _torch_save_stable(obj: Any, path: str) -> None:
    """``torch.save`` via a file object, so the archive inside is named ``archive`` and not
    after the temporary file: the same vectors always give the same bytes and sha256."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)


def _unit_rows(vectors: "np.ndarray") -> "np.ndarray":
    """float32 C-contiguous copy with every row scaled to unit L2 norm; rejects NaN/inf/zero rows."""
    import numpy as np

    v = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if v.ndim != 2:
        raise ValueError(f"vectors must be a 2-d array [N, D], got shape {v.shape}")
    if not np.isfinite(v).all():
        bad = np.flatnonzero(~np.isfinite(v).all(axis=1))
        raise ValueError(f"vectors rows {bad[:10].tolist()} contain NaN or inf")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"vectors rows {np.flatnonzero(norms[:, 0] == 0)[:10].tolist()} are all zeros")
    return np.ascontiguousarray(v / norms, dtype=np.float32)


# ------------------------------------------------------------------------- write


def write_index_files(
    out_dir: str | os.PathLike[str],
    vectors: "np.ndarray",
    gallery_paths: Sequence[str],
    metadata: Sequence[dict],
    *,
    index_type: str,
    model_id: str,
    pretrained: str,
    manifest_extra: dict | None = None,
) -> dict:
    """Write one index directory in the service's formats and return its manifest.

    Arguments:
        out_dir: directory to fill (created if needed); files in it are replaced.
        vectors: ``[N, D]`` embeddings, row i for ``gallery_paths[i]``; rows are
            re-normalised to unit length in float32.
        gallery_paths: the path the service shows for each row (``index_data.pt``).
        metadata: one record per row with the keys in :data:`METADATA_KEYS`
            (values may be ``None``; extra keys are kept).
        index_type: ``"normal"`` or ``"defect"`` (written into ``metadata.json``).
        model_id, pretrained: what the service should believe embedded the gallery,
            e.g. ``"ViT-B-32"``, ``"openai"``.
        manifest_extra: more JSON-able facts for ``manifest.json`` (source prefix,
            run id, created time, source fingerprint, model identity, random
            weights...); may not reuse the manifest's own keys.

    Returns the manifest dict (also written to ``manifest.json``, last).
    Raises ``ValueError`` for inconsistent inputs (lengths, missing metadata
    keys, empty gallery, non-finite vectors).
    """
    import faiss
    import torch

    out = Path(out_dir)
    v = _unit_rows(vectors)
    n, d = v.shape
    paths = [str(p) for p in gallery_paths]
    records = [dict(r) for r in metadata]
    if n == 0:
        raise ValueError("refusing to write an empty index (no vectors): the service would serve no results")
    if len(paths) != n or len(records) != n:
        raise ValueError(f"{n} vectors but {len(paths)} gallery paths and {len(records)} metadata records")
    for i, rec in enumerate(records):
        missing = [k for k in METADATA_KEYS if k not in rec]
        if missing:
            raise ValueError(f"metadata record {i} ({rec.get('file_name', paths[i])}) lacks keys {missing}")
    out.mkdir(parents=True, exist_ok=True)

    index = faiss.IndexFlatIP(d)
    index.add(v)
    _write_atomic(out / FAISS_FILE, lambda tmp: faiss.write_index(index, tmp))

    index_data = {
        "gallery_paths": paths,
        "gallery_embs": torch.from_numpy(v.copy()),
        "model_id": str(model_id),
        "pretrained": str(pretrained),
    }
    _write_atomic(out / INDEX_DATA_FILE, lambda tmp: _torch_save_stable(index_data, tmp))
    _write_atomic(out / EMBEDDINGS_FILE, lambda tmp: _torch_save_stable(torch.from_numpy(v.copy()), tmp))
    _write_json(
        out / METADATA_FILE,
        {
            "index_type": index_type,
            "num_images": n,
            "model_id": str(model_id),
            "pretrained": str(pretrained),
            "metadata": records,
        },
    )

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "index_type": index_type,
        "model": str(model_id),
        "pretrained": str(pretrained),
        "count": n,
        "dim": d,
        "files": {
            name: {"sha256": _sha256(out / name), "bytes": (out / name).stat().st_size} for name in SERVICE_FILES
        },
    }
    extra = dict(manifest_extra or {})
    clash = sorted(set(extra) & set(manifest))
    if clash:
        raise ValueError(f"manifest_extra may not override manifest keys {clash}")
    manifest.update(extra)
    manifest.setdefault("written_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    _write_json(out / MANIFEST_FILE, manifest)
    log.info("wrote %s index: %d vectors x %d to %s", index_type, n, d, out)
    return manifest


# ------------------------------------------------------------------------ verify


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexVerificationError(path, "missing") from None
    except (OSError, ValueError) as exc:
        raise IndexVerificationError(path, f"not readable JSON ({exc})") from None


def _torch_load(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise IndexVerificationError(path, "missing") from None
    except Exception as exc:
        raise IndexVerificationError(path, f"torch.load failed ({type(exc).__name__}: {exc})") from None


def _check_matrix(path: Path, t: Any, what: str, n: int, d: int) -> "np.ndarray":
    import torch

    if not isinstance(t, torch.Tensor):
        raise IndexVerificationError(path, f"{what} is {type(t).__name__}, expected a FloatTensor[N, D]")
    if t.dtype != torch.float32:
        raise IndexVerificationError(path, f"{what} has dtype {t.dtype}, expected torch.float32")
    if tuple(t.shape) != (n, d):
        raise IndexVerificationError(path, f"{what} has shape {tuple(t.shape)}, expected ({n}, {d}) as in the manifest")
    return t.numpy()


def verify_index(index_dir: str | os.PathLike[str]) -> dict:
    """Load an index directory the way the service does and check it is consistent.

    Checks: the manifest lists every service file with a matching sha256; the
    FAISS index is an ``IndexFlatIP`` of manifest count x dim; ``index_data.pt``,
    ``embeddings.pt`` and the FAISS vectors are identical float32 ``[N, D]``;
    ``metadata.json`` has N records with the required keys; model id /
    pretrained agree everywhere; vectors are unit-norm; and every vector finds
    itself first (a different row is accepted only with an equal score, i.e. an
    identical duplicate image).

    Returns a summary dict (count, dim, index_type, model_id, pretrained,
    self_top1, ties). Raises :class:`IndexVerificationError` naming the file and
    the problem.
    """
    import faiss
    import numpy as np

    root = Path(index_dir)
    if not root.is_dir():
        raise IndexVerificationError(root, "index directory does not exist")
    manifest_path = root / MANIFEST_FILE
    manifest = _load_json(manifest_path)
    try:
        n, d = int(manifest["count"]), int(manifest["dim"])
        model_id, pretrained = str(manifest["model"]), str(manifest["pretrained"])
        files = manifest["files"]
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexVerificationError(manifest_path, f"lacks or garbles a required field ({exc})") from None

    if not isinstance(files, dict):
        raise IndexVerificationError(manifest_path, "'files' is not an object of file name -> {sha256, bytes}")
    for name in SERVICE_FILES:
        path = root / name
        if not isinstance(files.get(name), dict):
            raise IndexVerificationError(manifest_path, f"does not list {name}")
        if not path.is_file():
            raise IndexVerificationError(path, "missing")
        actual = _sha256(path)
        if actual != files[name].get("sha256"):
            raise IndexVerificationError(path, f"sha256 {actual[:12]}... differs from the manifest's {str(files[name].get('sha256'))[:12]}...")

    # FAISS, as the service reads it
    faiss_path = root / FAISS_FILE
    try:
        loaded = faiss.read_index(str(faiss_path))  # owns the C++ object: keep it referenced
    except Exception as exc:
        raise IndexVerificationError(faiss_path, f"faiss.read_index failed ({exc})") from None
    index = faiss.downcast_index(loaded)
    if not isinstance(index, faiss.IndexFlatIP):
        raise IndexVerificationError(faiss_path, f"is {type(index).__name__}, expected IndexFlatIP")
    if index.d != d or index.ntotal != n:
        raise IndexVerificationError(faiss_path, f"holds {index.ntotal} x {index.d}, manifest says {n} x {d}")
    faiss_vectors = index.reconstruct_n(0, n) if n else np.zeros((0, d), np.float32)

    # older loader
    data_path = root / INDEX_DATA_FILE
    data = _torch_load(data_path)
    if not isinstance(data, dict):
        raise IndexVerificationError(data_path, f"holds {type(data).__name__}, expected a dict")
    for key in ("gallery_paths", "gallery_embs", "model_id", "pretrained"):
        if key not in data:
            raise IndexVerificationError(data_path, f"lacks key {key!r}")
    gallery = _check_matrix(data_path, data["gallery_embs"], "gallery_embs", n, d)
    paths = data["gallery_paths"]
    if not isinstance(paths, list) or len(paths) != n or not all(isinstance(p, str) for p in paths):
        raise IndexVerificationError(data_path, f"gallery_paths must be a list of {n} strings")
    if (data["model_id"], data["pretrained"]) != (model_id, pretrained):
        raise IndexVerificationError(
            data_path, f"model {data['model_id']}/{data['pretrained']} differs from the manifest's {model_id}/{pretrained}"
        )

    # newer loader
    emb_path = root / EMBEDDINGS_FILE
    embs = _check_matrix(emb_path, _torch_load(emb_path), "embeddings", n, d)
    meta_path = root / METADATA_FILE
    meta = _load_json(meta_path)
    if not isinstance(meta, dict):
        raise IndexVerificationError(meta_path, "is not a JSON object")
    records = meta.get("metadata")
    if meta.get("num_images") != n or not isinstance(records, list) or len(records) != n:
        raise IndexVerificationError(
            meta_path, f"num_images {meta.get('num_images')} / {len(records) if isinstance(records, list) else 'no'} records, expected {n}"
        )
    if (meta.get("model_id"), meta.get("pretrained")) != (model_id, pretrained):
        raise IndexVerificationError(meta_path, "model_id / pretrained differ from the manifest")
    if meta.get("index_type") != manifest.get("index_type"):
        raise IndexVerificationError(meta_path, f"index_type {meta.get('index_type')!r} differs from the manifest's")
    for i, rec in enumerate(records):
        missing = [k for k in METADATA_KEYS if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise IndexVerificationError(meta_path, f"record {i} lacks keys {missing}")

    # the three copies of the vectors are the same vectors
    if not np.array_equal(gallery, embs):
        raise IndexVerificationError(emb_path, "differs from index_data.pt gallery_embs")
    if not np.array_equal(faiss_vectors, embs):
        raise IndexVerificationError(faiss_path, "vectors differ from embeddings.pt")
    norms = np.linalg.norm(embs.astype(np.float64), axis=1)
    worst = int(np.argmax(np.abs(norms - 1.0))) if n else 0
    if n and (not np.isfinite(norms).all() or abs(norms[worst] - 1.0) > NORM_TOLERANCE):
        raise IndexVerificationError(emb_path, f"row {worst} has L2 norm {norms[worst]:.6f}, expected 1")

    # each image finds itself first (or an identical duplicate with the same score)
    ties = 0
    chunk = 1024
    for start in range(0, n, chunk):
        q = embs[start : start + chunk]
        scores, ids = index.search(q, 1)
        own = np.einsum("ij,ij->i", q, q)
        for j in range(q.shape[0]):
            row = start + j
            if ids[j, 0] == row:
                continue
            if ids[j, 0] >= 0 and math.isclose(float(scores[j, 0]), float(own[j]), abs_tol=TIE_TOLERANCE):
                ties += 1
                continue
            raise IndexVerificationError(
                faiss_path,
                f"row {row} ({paths[row]}) is not its own top-1: row {ids[j, 0]} scores {scores[j, 0]:.6f} vs own {own[j]:.6f}",
            )
    summary = {
        "index_type": manifest.get("index_type"),
        "count": n,
        "dim": d,
        "model_id": model_id,
        "pretrained": pretrained,
        "self_top1": n - ties,
        "ties": ties,
    }
    log.info("verified %s: %d x %d, every vector finds itself (%d exact-duplicate ties)", root, n, d, ties)
    return summary


# ------------------------------------------------------------------------ search


def load_service_index(index_dir: str | os.PathLike[str]):
    """``(faiss index, gallery_paths)`` loaded as the service's older loader does."""
    import faiss
    import torch

    root = Path(index_dir)
    index = faiss.read_index(str(root / FAISS_FILE))
    data = torch.load(root / INDEX_DATA_FILE, map_location="cpu", weights_only=True)
    return index, list(data["gallery_paths"])


def search(index_dir: str | os.PathLike[str], query_vectors: "np.ndarray", k: int = 5) -> list[list[Hit]]:
    """What the service does with query embeddings: L2-normalise, inner-product top-``k``.

    ``query_vectors`` is ``[Q, D]`` (or ``[D]``); returns one list of :class:`Hit`
    per query, best first (fewer than ``k`` when the gallery is smaller).
    """
    import numpy as np

    index, paths = load_service_index(index_dir)
    q = np.asarray(query_vectors, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    q = _unit_rows(q)
    scores, ids = index.search(q, min(k, index.ntotal))
    return [
        [Hit(int(i), paths[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0]
        for srow, irow in zip(scores, ids)
    ]
