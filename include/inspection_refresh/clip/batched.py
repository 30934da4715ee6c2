"""The batched model run: DataLoader workers decode and resize, model lanes encode.

A ``torch.utils.data.DataLoader`` whose worker process(es) (or this thread, with no
workers) read, decode and resize files with
:func:`~inspection_refresh.clip.preprocess.load_resized` feeds uint8 batches to the
model *lanes*: threads that each run ``encode_image`` on a different batch. Files
that cannot be decoded are reported with a reason, never raised.

What to embed, in which batches and on how many lanes is decided by
:func:`inspection_refresh.clip.embed.embed_files`; this module only runs that plan.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from inspection_refresh.clip.preprocess import load_resized

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from inspection_refresh.clip.model import LoadedModel
    from inspection_refresh.progress import Progress


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


def encode_batches(
    items: list[tuple[int, str]],
    batches: list[list[int]],
    model: LoadedModel,
    collect: Callable[[list[int], "np.ndarray"], None],
    progress: Progress,
    *,
    lanes: int,
    threads: int,
    num_workers: int,
    prefetch_batches: int,
) -> dict[int, str]:
    """Decode ``items`` (``(row, path)``) in ``batches`` (indices into ``items``) and encode them in ``lanes``.

    ``collect(rows, vectors)`` gets each batch's float32 unit vectors, in batch order;
    ``progress`` counts every image, embedded or not. ``torch.set_num_threads(threads)``
    holds for the run and is restored after it. Returns ``{row: reason}`` for the
    files that could not be decoded.
    """
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    loader = torch.utils.data.DataLoader(
        _ResizeDataset(items),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=model.device.startswith("cuda"),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=prefetch_batches if num_workers > 0 else None,
    )
    model.model  # a lazy model loads here, once, before the lanes start

    def done(rows: list[int], out: np.ndarray) -> None:
        collect(rows, out)
        progress.update(len(rows))

    failures: dict[int, str] = {}
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
                    done(rows_done, future.result())
            while pending:
                rows_done, future = pending.popleft()
                done(rows_done, future.result())
    finally:
        for _, future in pending:
            future.cancel()
        torch.set_num_threads(threads_before)
    return failures
