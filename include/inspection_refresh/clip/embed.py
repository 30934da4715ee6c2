"""Embed gallery images exactly as the service embeds its queries.

Reader -> mapper -> vectors, in the clip-retrieval manner:

1. every file is read once and hashed (sha256 of its bytes);
2. the :class:`EmbeddingCache` answers the hashes it knows (those files are never
   decoded);
3. a ``torch.utils.data.DataLoader`` whose worker process(es) read, decode and
   resize the misses feeds batches to the model *lanes*: threads that each run
   ``encode_image`` on a different batch. On CPU there is one single-threaded
   lane per core (see :func:`default_lanes` for why this beats one lane with
   every core's threads once decoding shares the cores); on a GPU, one lane;
4. new vectors go back into the cache batch by batch.

Preprocessing (the service's, see CONTRACT.md): ``PIL.Image.open`` ->
``convert("RGB")`` -> squash to 224x224 with ``Image.BILINEAR`` -> float in
[0, 1] (``/ 255``) -> subtract CLIP mean, divide by CLIP std -> ``encode_image``
-> divide by the L2 norm -> float32. :func:`preprocess_image` is the single
source of truth; the batched path splits it into a uint8 half (in the workers)
and an elementwise float half (in the lanes) that give bit-identical tensors,
which a unit test checks.

Measured (``bench/bench_clip.py``, 650 JPEGs of 1200x900, ViT-B-32 fp32, 2
cores): the embed stage runs at about 92 % of the bare model's best throughput
on pre-decoded tensors, and faster than the bare model run the usual way (one
forward with both cores' threads).

Unreadable files (missing, empty, corrupt, not an image) are skipped, reported
in :attr:`EmbedResult.failures` and logged once each; they never stop a run.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from inspection_refresh.clip.cache import EmbeddingCache
from inspection_refresh.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

log = logging.getLogger(__name__)

IMAGE_SIZE = (224, 224)
"""(width, height) the service squashes every image to."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


_LOAD_LOCK = threading.Lock()


class CLIPWeightsError(RuntimeError):
    """The CLIP model or its weights could not be loaded; the message says what to do."""


# --------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    """An open_clip model ready to embed images, and what it is.

    ``identity`` is :func:`inspection_refresh.clip.weights.model_identity` (the
    cache key); ``random_init`` is True for checkpoints made by
    :func:`~inspection_refresh.clip.weights.create_random_checkpoint`, whose
    embeddings mean nothing. ``model`` is the open_clip module in eval mode; with
    ``load_model(..., lazy=True)`` it is built on first use, so a run whose
    images are all cached never loads the weights.
    """

    model_name: str
    pretrained: str
    device: str
    identity: str
    embed_dim: int
    random_init: bool
    _model: Any = field(default=None, repr=False)
    _loader: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def model(self) -> Any:
        if self._model is None:
            with _LOAD_LOCK:
                if self._model is None:
                    if self._loader is None:
                        raise CLIPWeightsError(f"no model and no way to load {self.model_name} {self.pretrained!r}")
                    self._model = self._loader()
        return self._model

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory yet."""
        return self._model is not None

    def encode_uint8(self, batch: "torch.Tensor") -> "np.ndarray":
        """uint8 ``[B, 3, 224, 224]`` from :func:`load_resized` -> float32 unit vectors ``[B, D]``.

        Normalises on the model's device; safe to call from several threads at once.
        """
        return self.encode(normalize_uint8(batch.to(self.device, non_blocking=True)))

    def encode(self, batch: "torch.Tensor") -> "np.ndarray":
        """Normalised image batch ``[B, 3, 224, 224]`` -> float32 unit vectors ``[B, D]``."""
        import torch

        model = self.model
        with torch.inference_mode():
            feats = model.encode_image(batch.to(self.device, non_blocking=True))
            feats = feats.float()
            feats = feats / feats.norm(dim=-1, keepdim=True)
            return feats.cpu().numpy().astype("float32", copy=False)


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is usable, else ``"cpu"``; others are checked."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIPWeightsError(f"device {device!r} was asked for but torch sees no CUDA GPU; use 'cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'")
    return device


def _create_model(model_name: str, pretrained: str, device: str) -> Any:
    """``open_clip.create_model_and_transforms`` as the service calls it, in eval mode, or a clear error."""
    import open_clip
    import torch

    try:
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except Exception as exc:
        if os.path.isfile(str(pretrained)):
            hint = (
                f"the checkpoint file {pretrained} exists but did not load into {model_name}: "
                "check that it was saved for this model (state_dict keys and shapes)"
            )
        else:
            hint = (
                f"weights tag {pretrained!r} for {model_name} must come from the Hugging Face hub cache "
                "(HF_HOME / HF_HUB_CACHE) or be downloaded; on an offline machine, fetch them once where "
                f"there is internet (open_clip.create_model({model_name!r}, pretrained={pretrained!r})) and copy "
                "the cache over, or save the weights to a file and set INSPECTION_CLIP_PRETRAINED to its path"
            )
        raise CLIPWeightsError(f"could not load CLIP {model_name} weights {pretrained!r}: {exc}; {hint}") from exc
    model.eval()
    if device.startswith("cuda"):
        # keep fp32 semantics on the GPU (cuDNN would use TF32 for the patch-embedding conv)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    log.info("loaded CLIP %s weights %s on %s", model_name, pretrained, device)
    # open_clip has just logged the transform it builds (bicubic, resize_mode "shortest", centre crop);
    # that transform is discarded, and a reader of the log must not take it for what the gallery gets.
    log.info("CLIP preprocessing used (the service's, not open_clip's transform above): %s", describe_preprocessing())
    return model


def load_model(
    model_name: str = "ViT-B-32", pretrained: str = "openai", device: str = "auto", *, lazy: bool = False
) -> LoadedModel:
    """Load open_clip ``model_name`` with weights ``pretrained`` (tag or checkpoint path), in eval mode.

    The model is built exactly as the service builds it,
    ``open_clip.create_model_and_transforms(model_name, pretrained=pretrained)``,
    in fp32. ``device`` is ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``. With
    ``lazy=True`` only the identity is worked out now and the weights are
    loaded on first use (an all-cached run then costs no model load).

    Raises :class:`CLIPWeightsError` naming the tag or file and what to do when
    the weights cannot be had (this machine may be offline).
    """
    import open_clip

    from inspection_refresh.clip.weights import is_random_checkpoint, model_identity

    dev = resolve_device(device)
    try:
        identity = model_identity(model_name, pretrained)
    except ValueError as exc:
        raise CLIPWeightsError(
            f"cannot use CLIP weights {pretrained!r} for {model_name}: {exc}. "
            "Set the DAG param / INSPECTION_CLIP_PRETRAINED to an open_clip tag (e.g. 'openai') "
            "or to an existing checkpoint file."
        ) from exc
    config = open_clip.get_model_config(model_name)
    random_init = is_random_checkpoint(pretrained)
    if random_init:
        log.warning("CLIP %s weights %s are RANDOM (test/demo checkpoint): embeddings carry no meaning", model_name, pretrained)
    loaded = LoadedModel(
        model_name=model_name,
        pretrained=str(pretrained),
        device=dev,
        identity=identity,
        embed_dim=int(config["embed_dim"]) if config else 0,
        random_init=random_init,
        _loader=lambda: _create_model(model_name, str(pretrained), dev),
    )
    if not lazy or not config:
        loaded._model = loaded._loader()  # type: ignore[misc]
        loaded.embed_dim = int(loaded._model.visual.output_dim)
    return loaded


# ------------------------------------------------------------------- preprocessing


def describe_preprocessing() -> str:
    """What :func:`preprocess_image` does, in one line, from the constants it uses (for logs)."""
    from inspection_refresh.clip.weights import PREPROCESS_VERSION

    width, height = IMAGE_SIZE
    mean = ", ".join(f"{v:.4f}" for v in CLIP_MEAN)
    std = ", ".join(f"{v:.4f}" for v in CLIP_STD)
    return (f"RGB, {width}x{height} bilinear squash (no crop, aspect ratio not kept), /255, "
            f"CLIP mean ({mean}) / std ({std}), encode_image, L2-normalised float32 [{PREPROCESS_VERSION}]")


def load_resized(path: str | os.PathLike[str]) -> "torch.Tensor":
    """First half of the preprocessing: file -> RGB -> 224x224 bilinear -> uint8 ``[3, 224, 224]``.

    Raises whatever PIL raises for an unreadable file.
    """
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        # convert("RGB") of an RGB image is a plain copy: skip it, the pixels are the same
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        resized = rgb.resize(IMAGE_SIZE, Image.BILINEAR)
    # HWC -> CHW in numpy: single-threaded, so a decode worker never wakes torch's thread pool
    chw = np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))
    return torch.from_numpy(chw)


def normalize_uint8(batch: "torch.Tensor") -> "torch.Tensor":
    """Second half: uint8 ``[..., 3, H, W]`` -> float32, ``/ 255``, minus CLIP mean, over CLIP std.

    The same elementwise operations, in the same order, as torchvision's
    ``ToTensor()`` + ``Normalize(mean, std)``; works on one image or a batch, on
    any device.
    """
    import torch

    x = batch.to(dtype=torch.float32).div(255)
    mean = torch.as_tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def preprocess_image(path: str | os.PathLike[str]) -> "torch.Tensor":
    """The service's preprocessing of one image file: float32 ``[3, 224, 224]``, CLIP-normalised."""
    return normalize_uint8(load_resized(path))


def embed_image(path: str | os.PathLike[str], model: LoadedModel) -> "np.ndarray":
    """One file -> float32 unit vector ``[D]``; the reference (unbatched) path, as the service's query."""
    return model.encode(preprocess_image(path).unsqueeze(0))[0]


# ----------------------------------------------------------------- batched reading


class _ResizeDataset:
    """Map-style dataset over ``(row, path)``: yields ``(row, uint8 tensor | None, reason | None)``."""

    def __init__(self, items: list[tuple[int, str]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        row, path = self.items[i]
        try:
            return row, load_resized(path), None
        except Exception as exc:  # corrupt / not an image: reported, never fatal
            return row, None, _describe_error(exc)


def _collate(samples):
    """``[(row, tensor|None, reason|None)]`` -> ``(rows_ok, uint8 [B,3,H,W] | None, [(row, reason)])``."""
    import torch

    rows = [r for r, t, _ in samples if t is not None]
    tensors = [t for _, t, _ in samples if t is not None]
    failed = [(r, why) for r, t, why in samples if t is None]
    return rows, (torch.stack(tensors) if tensors else None), failed


def _batches(n: int, batch_size: int, first: int = 8, lanes: int = 1) -> list[list[int]]:
    """Index batches for ``n`` images.

    Each lane's first batch is small (``first``) so the model starts after a few
    decodes, not a full batch. The last, partial round (with the round before it
    when the remainder is small) is split evenly across the lanes, so they
    finish together instead of one lane running a batch alone at the end.
    """
    lanes = max(1, lanes)
    sizes: list[int] = []
    rest = n
    for _ in range(lanes):
        if rest <= 0:
            break
        sizes.append(min(first, batch_size, rest))
        rest -= sizes[-1]
    round_size = batch_size * lanes
    full_rounds, tail = divmod(rest, round_size)
    if lanes > 1 and full_rounds and 0 < tail < round_size // 2:
        full_rounds, tail = full_rounds - 1, tail + round_size
    sizes += [batch_size] * (full_rounds * lanes)
    if tail:
        parts = min(lanes, tail)
        sizes += [tail // parts + (1 if i < tail % parts else 0) for i in range(parts)]
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def _worker_init(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # workers only decode; leave the cores to the model


def _describe_error(exc: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL can read (UnidentifiedImageError)"
    text = str(exc).strip() or "no detail"
    if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)):
        return f"corrupt or truncated image ({type(exc).__name__}: {text})"
    return f"{type(exc).__name__}: {text}"


def _hash_file(path: Path) -> tuple[str | None, int, str | None]:
    """``(sha256, size, None)`` or ``(None, 0, reason)`` for a file that cannot be read or is empty."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, 0, f"cannot read file: {exc.strerror or exc}"
    if not data:
        return None, 0, "empty file (0 bytes)"
    return hashlib.sha256(data).hexdigest(), len(data), None


# ------------------------------------------------------------------------- embedding


@dataclass
class EmbedResult:
    """What :func:`embed_files` made of its ``paths``.

    ``vectors[j]`` is the embedding of ``paths[ok_indices[j]]`` (ascending order);
    ``failures`` lists ``(index into paths, reason)`` of the files skipped.
    """

    vectors: "np.ndarray"
    ok_indices: list[int]
    failures: list[tuple[int, str]] = field(default_factory=list)
    embedded: int = 0
    """Distinct images run through the model in this call (identical files count once)."""
    cached: int = 0
    """Rows whose vector came from the cache (not decoded at all)."""
    seconds: float = 0.0
    images_per_second: float = 0.0
    """Images run through the model per second of the whole call (0 when all came from the cache)."""
    model_identity: str = ""

    def summary(self) -> dict:
        """Small JSON-able dict for logs, XCom and ``deployment_logs.result_data``."""
        return {
            "num_images": len(self.ok_indices),
            "embedding_dim": int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0,
            "embedded": self.embedded,
            "cached": self.cached,
            "failed": len(self.failures),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "model_identity": self.model_identity,
        }


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` ignores cpusets/taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_num_threads(device: str, num_workers: int) -> int:
    """Intra-op threads for a single model lane: every usable core on CPU; 1 on a GPU."""
    if device.startswith("cuda"):
        return 1
    return usable_cpus()


def default_lanes(device: str) -> int:
    """Model lanes: one single-threaded lane per usable core on CPU, one lane on a GPU.

    On a few CPU cores, N lanes of 1 thread beat 1 lane of N threads once decoding
    shares the cores: a multi-threaded forward waits at every barrier for the
    thread that the decoder pre-empted (and spins while it waits), so each
    millisecond of decoding costs about two of model time. Single-threaded lanes
    have no barriers: decoding only takes the CPU time it really uses.
    """
    if device.startswith("cuda"):
        return 1
    return usable_cpus()


def embed_files(
    paths: Sequence[str | os.PathLike[str]],
    model: LoadedModel,
    batch_size: int = 32,
    cache: EmbeddingCache | None = None,
    full_rebuild: bool = False,
    num_workers: int = 1,
    progress_label: str = "embed images",
    *,
    lanes: int | None = None,
    num_threads: int | None = None,
    prefetch_batches: int = 2,
    progress_interval: float = 5.0,
) -> EmbedResult:
    """Embed image files with ``model``, reusing ``cache`` for files whose bytes it has seen.

    Arguments:
        paths: image files; unreadable ones are skipped and reported, never fatal.
        model: from :func:`load_model`.
        batch_size: images per ``encode_image`` call.
        cache: persistent vectors keyed by (sha256 of file bytes, ``model.identity``);
            ``None`` embeds everything and stores nothing.
        full_rebuild: ignore cached vectors (recompute and overwrite them).
        num_workers: DataLoader worker processes that read, decode and resize while
            the model runs; ``0`` decodes in this thread, which still overlaps the
            model when it runs in lanes (PIL releases the GIL while decoding). A daemonic
            process (an Airflow task run by a Celery prefork worker) may not start child
            processes, so there it is always ``0``.
        progress_label: first words of the progress lines.
        lanes: model threads encoding different batches at once (default
            :func:`default_lanes`: one per core on CPU, each with one intra-op
            thread; 1 on a GPU).
        num_threads: ``torch.set_num_threads`` when there is a single lane
            (default :func:`default_num_threads`); restored afterwards.
        prefetch_batches: batches each worker prepares ahead.
        progress_interval: seconds between progress lines.

    Returns an :class:`EmbedResult`. Identical files (same bytes) are embedded once.
    """
    import numpy as np
    import torch

    started = time.monotonic()
    paths = [Path(p) for p in paths]
    n = len(paths)

    # 1. read + hash every file (cheap next to decoding); empty/unreadable files fail here
    shas: list[str | None] = [None] * n
    failures: dict[int, str] = {}
    for i, p in enumerate(paths):
        sha, _size, why = _hash_file(p)
        if why:
            failures[i] = why
        shas[i] = sha

    # 2. cache lookup; the rest, one representative per distinct content, is to embed
    vectors: dict[str, np.ndarray] = {}
    if cache is not None and not full_rebuild:
        vectors.update(cache.get_many(model.identity, {s for s in shas if s}))
    to_embed: list[tuple[int, str]] = []
    seen: set[str] = set(vectors)
    for i, sha in enumerate(shas):
        if sha and sha not in seen:
            seen.add(sha)
            to_embed.append((i, str(paths[i])))
    n_cached_rows = sum(1 for s in shas if s and s in vectors)
    lanes = lanes or default_lanes(model.device)
    if num_workers > 0 and multiprocessing.current_process().daemon:
        log.info("Decoding in this process: it is daemonic (e.g. a Celery worker's task), which may not start "
                 "DataLoader worker processes")
        num_workers = 0
    log.info(
        "%s: %d files, %d from cache, %d distinct to embed, %d unreadable so far "
        "(model %s on %s, batch %d, %d decode worker(s), %d model lane(s))",
        progress_label, n, n_cached_rows, len(to_embed), len(failures), model.identity, model.device,
        batch_size, num_workers, lanes,
    )

    # 3. decode in the DataLoader (worker processes, or this thread), encode in model lanes
    embedded = 0
    if to_embed:
        threads = 1 if lanes > 1 else (num_threads or default_num_threads(model.device, num_workers))
        threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        progress = Progress(progress_label, total=len(to_embed), unit="images", interval=progress_interval, logger=log)
        loader = torch.utils.data.DataLoader(
            _ResizeDataset(to_embed),
            batch_sampler=_batches(len(to_embed), batch_size, lanes=lanes),
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=model.device.startswith("cuda"),
            worker_init_fn=_worker_init if num_workers > 0 else None,
            prefetch_factor=prefetch_batches if num_workers > 0 else None,
        )
        row_sha = {row: shas[row] for row, _ in to_embed}
        model.model  # a lazy model loads here, once, before the lanes start

        def collect(rows: list[int], out: np.ndarray) -> None:
            nonlocal embedded
            fresh = [(row_sha[row], out[j]) for j, row in enumerate(rows)]
            vectors.update(fresh)
            if cache is not None:
                cache.put_many(model.identity, fresh)
            embedded += len(rows)
            progress.update(len(rows))

        pending: deque = deque()
        try:
            with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="clip-lane") as pool:
                for rows, batch, failed in loader:
                    for row, why in failed:
                        failures[row] = why
                    progress.update(len(failed))
                    if batch is not None:
                        pending.append((rows, pool.submit(model.encode_uint8, batch)))
                    while len(pending) > lanes:  # one batch waits per lane: bounded memory, no idle lane
                        rows_done, future = pending.popleft()
                        collect(rows_done, future.result())
                while pending:
                    rows_done, future = pending.popleft()
                    collect(rows_done, future.result())
        finally:
            for _, future in pending:
                future.cancel()
            torch.set_num_threads(threads_before)
        progress.finish()

    # 4. assemble rows in path order; a content that failed to decode fails for every copy
    bad_shas = {shas[i] for i in failures if shas[i]}
    for i, sha in enumerate(shas):
        if sha in bad_shas and i not in failures:
            failures[i] = failures[next(j for j in failures if shas[j] == sha)]
    ok = [i for i in range(n) if i not in failures and shas[i] in vectors]
    for i in sorted(failures):
        log.warning("%s: skipping %s: %s", progress_label, paths[i], failures[i])
    dim = model.embed_dim
    mat = np.stack([vectors[shas[i]] for i in ok]).astype(np.float32, copy=False) if ok else np.zeros((0, dim), np.float32)
    seconds = time.monotonic() - started
    fresh_shas = {shas[r] for r, _ in to_embed}
    cached_rows = sum(1 for i in ok if shas[i] not in fresh_shas)
    result = EmbedResult(
        vectors=mat,
        ok_indices=ok,
        failures=sorted(failures.items()),
        embedded=embedded,
        cached=cached_rows,
        seconds=seconds,
        images_per_second=(embedded / seconds) if embedded else 0.0,
        model_identity=model.identity,
    )
    log.info(
        "%s: %d vectors (%d embedded now, %d reused), %d skipped, %.1fs",
        progress_label, len(ok), embedded, cached_rows, len(failures), seconds,
    )
    return result
