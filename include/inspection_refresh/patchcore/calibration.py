"""Scoring against a bank and calibrating thresholds: FAISS nearest neighbours, tau, AUROC, histogram.

Scores are L2 distances (``sqrt`` of FAISS ``IndexFlatL2`` squared distances) from
each patch to its nearest bank row; an image's score is the 99th percentile of its
patch distances, as the service computes it (CONTRACT.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SCORE_PERCENTILE = 99.0


class NearestNeighbourScorer:
    """Exact nearest-neighbour L2 distances to a fixed bank ``float32 [M, D]``."""

    def __init__(self, bank: np.ndarray) -> None:
        import faiss

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.index = faiss.IndexFlatL2(bank.shape[1])
        self.index.add(bank)

    def distances(self, patches: np.ndarray) -> np.ndarray:
        """``float32 [P]``: distance of each patch (``[P, D]``) to its nearest bank row."""
        squared, _ = self.index.search(np.ascontiguousarray(patches, dtype=np.float32), 1)
        return np.sqrt(np.maximum(squared[:, 0], 0.0))


def image_score(patch_distances: np.ndarray) -> float:
    """An image's anomaly score: the 99th percentile of its patch distances."""
    return float(np.percentile(patch_distances, IMAGE_SCORE_PERCENTILE))


def calibrate_tau(holdout_distances: list[np.ndarray], pixel_pct: float, image_pct: float) -> dict[str, float]:
    """``{"pixel", "image"}`` from held-out normal images' patch distances (one array per image).

    pixel: the ``pixel_pct`` percentile of all their patch distances; image: the
    ``image_pct`` percentile of their image scores.
    """
    if not holdout_distances:
        raise ValueError("no held-out images to calibrate tau on")
    scores = [image_score(d) for d in holdout_distances]
    return {
        "pixel": float(np.percentile(np.concatenate(holdout_distances), pixel_pct)),
        "image": float(np.percentile(scores, image_pct)),
    }


def auroc(normal_scores: np.ndarray | list[float], defect_scores: np.ndarray | list[float]) -> float:
    """Area under the ROC curve for "defect scores higher": the Mann-Whitney U statistic, ties counted half."""
    normal, defect = np.asarray(normal_scores, dtype=np.float64), np.asarray(defect_scores, dtype=np.float64)
    if not len(normal) or not len(defect):
        raise ValueError("AUROC needs at least one normal and one defect score")
    _, inverse, counts = np.unique(np.concatenate([normal, defect]), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each distinct value
    defect_rank_sum = average_rank[inverse[len(normal):]].sum()
    return float((defect_rank_sum - len(defect) * (len(defect) + 1) / 2.0) / (len(normal) * len(defect)))


def plot_histogram(path: Path, normal_scores: list[float], defect_scores: list[float], tau_image: float,
                   title: str) -> None:
    """PNG histogram of held-out normal (and defect, if any) image scores with ``tau_image`` marked."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    values = list(normal_scores) + list(defect_scores) + [tau_image]
    bins = np.linspace(min(values), max(values), 31) if max(values) > min(values) else 10
    ax.hist(normal_scores, bins=bins, alpha=0.6, color="tab:blue", label=f"held-out normal ({len(normal_scores)})")
    if len(defect_scores):
        ax.hist(defect_scores, bins=bins, alpha=0.6, color="tab:red", label=f"defect ({len(defect_scores)})")
    ax.axvline(tau_image, color="black", linestyle="--", label=f"tau image = {tau_image:.4f}")
    ax.set_xlabel("image score (99th percentile of patch NN distances)")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
