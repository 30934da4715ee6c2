"""Suspected defects among a product's normal images: every normal image scored out of sample.

A defect photo in a product's ``ok/`` folder teaches PatchCore the defect as normal: its
patches enter the bank, and the image then scores low against a bank that holds them. So
each normal image is scored against bank rows that did *not* come from it, and the images
whose score is above the calibrated ``tau["image"]`` are listed, highest first.

How (and why this is sound and cheap):

* **Held-out images** are already scored out of sample: the calibration bank is a coreset of
  the *other* normal images only (:mod:`.product`, step 3). Their scores are reused.
* **Calibration-bank images** are scored *leave-one-image-out* against the calibration bank:
  a coreset row is a real patch, so the reservoir records which image each row came from
  (:attr:`.reservoir.PatchReservoir.sources`) and each patch's distance is taken to the
  nearest bank row of *another* image. That is the held-out situation for each image: a
  greedy coreset of (all but one of) the same images, at the same density, so the score is
  comparable with tau, which was calibrated on held-out scores -- up to one bias: the coreset
  placed rows of the image itself where its patches are, so without them the bank is thinnest
  exactly around that image, and left-out scores run higher than held-out ones (measured: about
  1 % at the defaults, 10-30 % on tiny test images whose banks have two rows per image). The
  left-out scores are therefore scaled by ``median(held-out) / median(left-out)`` (never up,
  :func:`left_out_scale`; medians, so a few defects among the normals do not move it) before
  the comparison; ``raw_score`` keeps the unscaled value. The calibration images are
  independent of tau (it comes from the held-out images only), so "score > tau" means "the
  service would call this normal image anomalous".
  A second fold (a coreset of the held-out images scoring the calibration images) would be a
  bank of a quarter as many images as the one tau was calibrated against, covering less of the
  normal variation, so its scores would run higher than tau's scale by an unknown amount.
* **Listed** are the images above tau *and* above a robust bar (:func:`robust_bar`: the same
  percentile of a normal distribution fitted to all the out-of-sample scores by median and
  MAD). tau is a high percentile of a dozen held-out scores, close to their maximum: the
  highest held-out image is above it by construction, and each clean left-out image exceeds
  it with a chance of about 1 in (held-out + 1) -- a handful of clean images per build just
  above tau. The bar is estimated from all the normal images and a few defects do not move it.
* Cost: one pass over the calibration images' patches (already held in the reservoir; nothing
  is decoded or extracted again) against the calibration bank, in blocks -- the held-out
  scoring's matrix product, four times over at the default 20 % hold-out: 1.07-1.10x the
  build without it at the defaults (``bench/bench_patchcore_quality.py``, 60 images of 900x900
  on two shared cores; target <= 1.15x).
* Patches are scored exactly as the service does (L2 to the nearest row, FAISS's formula,
  image score = 99th percentile of the image's patch distances). When the reservoir had to
  sample (more patches than ``reservoir_max``), an image is scored on its patches still held,
  a uniform sample of them.

Limits: the same defect photo uploaded twice is not found here (each copy's rows explain the
other; the CLIP gallery hygiene check reports exact duplicates); a defect among the held-out
images raises tau itself, so other defects must score above it to be listed; and tau, a high
percentile of a few held-out scores, can be too low or too high by a few per cent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from inspection_refresh.patchcore.calibration import image_score

log = logging.getLogger("inspection_refresh.patchcore.build")

QUALITY_FILE = "quality.json"
METHOD = ("calibration-bank images: each patch against the nearest calibration-bank row taken from another image "
          "(leave-one-image-out by row provenance), scores scaled by median(held-out) / median(left-out) (at most "
          "1); held-out images: against the calibration bank, which holds none of their patches; image score = 99th "
          "percentile of patch distances; listed: above tau and above median + z(image_pct) * 1.4826 * MAD of all")
LOGGED_NAMES = 10
_PRODUCT_ELEMENTS = 1 << 24  # 64 MB of float32 distances at a time
_CHUNK_BYTES = 32 << 20  # patch features read at a time


def leave_one_image_out_distances(features: Any, sources: np.ndarray, bank: np.ndarray,
                                  bank_sources: np.ndarray) -> np.ndarray:
    """``float32 [N]``: each row's L2 distance to the nearest ``bank`` row of another source.

    ``features``: ``[N, D]`` rows (an array or the reservoir's spill file; read in blocks),
    ``sources[i]`` the image row ``i`` came from; ``bank_sources[j]`` likewise for bank row ``j``.
    ``inf`` where every bank row comes from the row's own image. Same formula as
    :class:`~.calibration.NearestNeighbourScorer` (``|q|^2 + |b|^2 - 2 q.b``, square root).
    """
    import torch

    bank_t = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    bank_sq = torch.einsum("ij,ij->i", bank_t, bank_t)
    bank_src = torch.from_numpy(np.asarray(bank_sources, dtype=np.int64))
    sources = np.asarray(sources, dtype=np.int64)
    num_rows, dim = int(features.shape[0]), int(features.shape[1])
    block = max(1, min(_PRODUCT_ELEMENTS // max(1, len(bank_t)), _CHUNK_BYTES // (4 * dim)))
    out = np.empty(num_rows, dtype=np.float32)
    for start in range(0, num_rows, block):
        queries = torch.from_numpy(np.ascontiguousarray(features[start : start + block], dtype=np.float32))
        products = torch.mm(queries, bank_t.T).mul_(-2.0).add_(bank_sq)
        own = torch.from_numpy(sources[start : start + len(queries)])[:, None] == bank_src[None, :]
        products.masked_fill_(own, math.inf)
        squared = products.min(dim=1).values.add_(torch.einsum("ij,ij->i", queries, queries))
        out[start : start + len(queries)] = squared.clamp_(min=0.0).sqrt_().numpy()
    return out


def scores_by_source(distances: np.ndarray, sources: np.ndarray, count: int) -> np.ndarray:
    """``float64 [count]``: the image score of each source ``0..count-1`` (NaN: no rows, or not scorable)."""
    scores = np.full(count, np.nan)
    sources = np.asarray(sources)
    order = np.argsort(sources, kind="stable")
    bounds = np.searchsorted(sources[order], np.arange(count + 1))
    for source in range(count):
        rows = distances[order[bounds[source] : bounds[source + 1]]]
        if len(rows) and np.isfinite(rows).all():
            scores[source] = image_score(rows)
    return scores


def suspected_defects(files: Sequence[str], scores: Sequence[float], tau_image: float) -> list[dict[str, Any]]:
    """``[{"file", "score", "score_over_tau"}]`` of the images scoring above ``tau_image``, highest first."""
    flagged = [(float(score), name) for name, score in zip(files, scores)
               if math.isfinite(score) and score > tau_image]
    flagged.sort(key=lambda item: (-item[0], item[1]))
    return [{"file": name, "score": round(score, 6), "score_over_tau": round(score / tau_image, 4)}
            for score, name in flagged]


def left_out_scale(left_out_scores: Sequence[float], held_out_scores: Sequence[float]) -> float:
    """The factor that takes leave-one-image-out scores onto the held-out scores' scale (at most 1).

    ``median(held-out) / median(left-out)``, clipped to ``[0.5, 1]``; 1 with fewer than 3 of either.
    Medians: a few defect images among the normals do not move them.
    """
    left = np.asarray([s for s in left_out_scores if math.isfinite(s)], dtype=np.float64)
    held = np.asarray([s for s in held_out_scores if math.isfinite(s)], dtype=np.float64)
    if len(left) < 3 or len(held) < 3:
        return 1.0
    return float(np.clip(np.median(held) / np.median(left), 0.5, 1.0))


def quality_record(left_out: dict[str, float], held_out: dict[str, float], tau_image: float,
                   seconds: float, image_pct: float = 99.5) -> dict[str, Any]:
    """The ``quality.json`` document: ``{file: out-of-sample score}`` of the calibration-bank images
    (``left_out``, leave-one-image-out) and of the held-out images, against ``tau_image``.

    An image is listed when its score is above tau *and* above :func:`robust_bar` of all the
    scores (see the module docstring).
    """
    scale = left_out_scale(list(left_out.values()), list(held_out.values()))
    files, scores = [*left_out, *held_out], [*(score * scale for score in left_out.values()), *held_out.values()]
    bar = robust_bar(scores, image_pct)
    kept = [(name, score) for name, score in zip(files, scores) if score > bar]
    suspects = suspected_defects([name for name, _ in kept], [score for _, score in kept], tau_image)
    for suspect in suspects:
        if suspect["file"] in left_out:
            suspect.update(scored_as="left out", raw_score=round(float(left_out[suspect["file"]]), 6))
        else:
            suspect.update(scored_as="held out")
    return {"method": METHOD, "tau": float(tau_image), "images_scored": sum(1 for s in scores if math.isfinite(s)),
            "seconds": round(seconds, 3), "left_out_scale": round(scale, 4),
            "robust_bar": round(bar, 6) if math.isfinite(bar) else None, "suspected_defects": suspects}


def robust_bar(scores: Sequence[float], image_pct: float) -> float:
    """``median + z * 1.4826 * MAD`` of ``scores``, ``z`` the normal ``image_pct`` quantile (-inf under 8 scores).

    The ``image_pct`` percentile of a normal distribution fitted to all the images' out-of-sample
    scores by median and median absolute deviation: estimated from every normal image rather
    than the few held-out ones, and moved by neither a few defects nor the held-out maximum.
    """
    values = np.asarray([s for s in scores if math.isfinite(s)], dtype=np.float64)
    if len(values) < 8:
        return -math.inf
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    return median + NormalDist().inv_cdf(min(image_pct, 99.99) / 100.0) * spread


def log_suspects(tag: str, record: dict[str, Any]) -> None:
    """One line: how many normal images score above tau out of sample, and the first few (score / tau)."""
    suspects = record["suspected_defects"]
    shown = ", ".join(f"{s['file']} {s['score_over_tau']:.2f}" for s in suspects[:LOGGED_NAMES])
    more = f" and {len(suspects) - LOGGED_NAMES} more" if len(suspects) > LOGGED_NAMES else ""
    log.log(logging.WARNING if suspects else logging.INFO,
            "%s %d of %d normal images score above tau out of sample%s (%.1fs)", tag, len(suspects),
            record["images_scored"], f" (suspected defects; score / tau): {shown}{more}" if suspects else "",
            record["seconds"])
