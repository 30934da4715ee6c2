"""The service's query path as a library: score one image against a bank (step 7 of its contract).

:class:`ReferenceScorer` decodes an image as the service does (:mod:`.images`), extracts its
patch features (:mod:`.features`), takes each patch's L2 distance to its nearest bank row
(FAISS ``IndexFlatL2``, square root taken), scores the image with
``numpy.percentile(distances, 99)`` and calls it anomalous when the score is above
``tau["image"]``; the patch map is thresholded with ``tau["pixel"]``.

The builder calibrates tau and computes AUROC with this same class (against its calibration
bank), the tests and the benchmark score published banks with it, and the demo report
shows its numbers: every score in this package is the score the service would compute.

Usage::

    scorer = ReferenceScorer.from_bank_dir("/data/patchCore/BRKT01", device="cpu")
    result = scorer.score("photo.jpg")
    result.score, result.is_anomalous, result.anomaly_map  # float, bool, bool [rows, cols]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inspection_refresh.patchcore.calibration import NearestNeighbourScorer, image_score
from inspection_refresh.patchcore.options import LAYER_CHANNELS

SERVICE_DEFAULTS = {"layers": list(LAYER_CHANNELS), "shorter": 512, "stride": 2}
"""What the service assumes when ``bank_config.json`` lacks a key."""


@dataclass(frozen=True)
class ImageScore:
    """One image scored as the service scores it."""

    path: Path
    score: float
    """The image score: 99th percentile of the patch distances."""
    is_anomalous: bool | None
    """``score > tau["image"]``; ``None`` when no tau is known (a calibration bank)."""
    patch_distances: np.ndarray
    """``float32 [rows, cols]``: each sampled patch's distance to its nearest bank row."""
    anomaly_map: np.ndarray | None
    """``bool [rows, cols]``: ``patch_distances > tau["pixel"]``; ``None`` without tau."""


class ReferenceScorer:
    """Scores images against a bank ``float32 [M, D]`` with a feature extractor, as the service does.

    Args:
        extractor: a :class:`~.features.PatchFeatureExtractor` built for the bank's layers and stride.
        bank: the memory bank rows.
        shorter: the short-side size images are resized to.
        tau: ``{"pixel", "image"}`` thresholds, or ``None`` (scores only).
        device: where the extractor runs.
        search: ``"faiss"``, the service's nearest-neighbour search, or ``"matmul"``, the same
            formula with torch's matrix product (float rounding differences only; see
            :class:`~.calibration.NearestNeighbourScorer`).
    """

    def __init__(self, extractor: Any, bank: np.ndarray, shorter: int, tau: dict[str, float] | None = None,
                 device: Any = "cpu", search: str = "faiss") -> None:
        if bank.shape[1] != extractor.feature_dim:
            raise ValueError(f"bank has {bank.shape[1]} columns; layers {extractor.layers} give "
                             f"{extractor.feature_dim}")
        self.extractor = extractor
        self.shorter = shorter
        self.tau = tau
        self.device = device
        self._neighbours = NearestNeighbourScorer(bank, search)

    @classmethod
    def from_bank_dir(cls, bank_dir: Path | str, weights: str | None = None, device: str = "auto") -> ReferenceScorer:
        """Load ``memory_bank.pt``, ``bank_config.json`` and ``tau.json`` the way the service does.

        ``layers``/``shorter``/``stride`` come from the config with the service's defaults when a
        key is missing. ``weights`` (``imagenet``, ``random`` or a path) defaults to what the config
        records, else ``imagenet`` (the service's ResNet-50).
        """
        import torch

        from inspection_refresh.patchcore.features import PatchFeatureExtractor, load_resnet50, resolve_device

        bank_dir = Path(bank_dir)
        config = json.loads((bank_dir / "bank_config.json").read_text())
        tau = json.loads((bank_dir / "tau.json").read_text())
        bank = torch.load(bank_dir / "memory_bank.pt", map_location="cpu", weights_only=True).numpy()
        layers = config.get("layers", SERVICE_DEFAULTS["layers"])
        recorded = config.get("weights") if isinstance(config.get("weights"), dict) else {}
        if weights is None:
            weights = recorded.get("path") if recorded.get("name") == "checkpoint" else recorded.get("name", "imagenet")
        backbone, _ = load_resnet50(weights, int(recorded.get("seed", 0)), layers)
        torch_device = resolve_device(device)
        extractor = PatchFeatureExtractor(backbone, layers, int(config.get("stride", SERVICE_DEFAULTS["stride"])))
        return cls(extractor.to(torch_device), bank, int(config.get("shorter", SERVICE_DEFAULTS["shorter"])),
                   {"pixel": float(tau["pixel"]), "image": float(tau["image"])}, torch_device)

    def features(self, path: Path | str) -> tuple[np.ndarray, tuple[int, int]]:
        """``(float32 [rows * cols, D], (rows, cols))``: the image's patch features and their grid."""
        import torch

        from inspection_refresh.patchcore.features import patch_grid
        from inspection_refresh.patchcore.images import load_rgb

        rgb = load_rgb(Path(path), self.shorter)
        pixels = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(self.device)
        feats = self.extractor(pixels)[0].cpu().numpy()
        return feats, patch_grid(rgb.shape[1], rgb.shape[0], self.extractor.layers[0], self.extractor.stride)

    def patch_distances(self, features: np.ndarray) -> np.ndarray:
        """``float32 [P]``: L2 distance of each patch feature to its nearest bank row."""
        return self._neighbours.distances(features)

    def score_features(self, features: np.ndarray) -> float:
        """The image score of already-extracted patch features."""
        return image_score(self.patch_distances(features))

    def score(self, path: Path | str) -> ImageScore:
        """Decode, extract and score one image file."""
        feats, grid = self.features(path)
        distances = self.patch_distances(feats).reshape(grid)
        value = image_score(distances.ravel())
        if self.tau is None:
            return ImageScore(Path(path), value, None, distances, None)
        return ImageScore(Path(path), value, value > self.tau["image"], distances, distances > self.tau["pixel"])
