"""Build options with their defaults, the layer vocabulary, and the errors this package raises.

No heavy imports here: the DAG and ``validate_bank`` read these without torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

LAYER_CHANNELS = {"layer2": 512, "layer3": 1024, "layer4": 2048}
"""torchvision ResNet50 stages the service understands, shallow to deep, with their channels."""

EXTRACTOR_VERSION = "inspection_refresh.patchcore/2-service-query-path"
"""Bumped whenever extraction changes in a way that changes the features.

``/2``: OpenCV decoding + INTER_AREA, upsample-then-normalise, IMAGENET1K_V2 (the service's
query path). Banks of ``/1`` (PIL bilinear, normalise-then-upsample, V1) are refused.
"""


class BankBuildError(RuntimeError):
    """A bank could not be built; the message names the file or directory and what to do."""


class BankValidationError(ValueError):
    """A bank directory does not hold what the service expects; the message says what is wrong."""


def parse_layers(layers: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"layer3,layer2"`` / ``"layer2 layer3"`` / a list -> ``["layer2", "layer3"]`` (shallow to deep).

    The contract upsamples every layer to the *first* layer's grid and concatenates in
    order; sorting by depth makes the first layer the shallowest and the recorded list
    unambiguous. Raises ``BankBuildError`` for unknown or repeated names.
    """
    if isinstance(layers, str):
        names = [part for part in layers.replace(",", " ").split() if part]
    else:
        names = [part.strip() for item in layers for part in str(item).replace(",", " ").split() if part.strip()]
    if not names:
        raise BankBuildError("no layers given; use e.g. --layers layer2,layer3")
    unknown = [name for name in names if name not in LAYER_CHANNELS]
    if unknown:
        raise BankBuildError(
            f"unknown layer name(s) {', '.join(map(repr, unknown))}; "
            f"the service supports {', '.join(LAYER_CHANNELS)} of torchvision resnet50"
        )
    if len(set(names)) != len(names):
        raise BankBuildError(f"layer listed twice in {names}; give each layer once")
    order = list(LAYER_CHANNELS)
    return sorted(names, key=order.index)


def feature_dim(layers: list[str]) -> int:
    """Channels of the concatenated feature for ``layers`` (e.g. 1536 for layer2+layer3)."""
    return sum(LAYER_CHANNELS[name] for name in layers)


OLD_BUILD_BANK_DEFAULTS = {
    "layers": "layer2,layer3,layer4",
    "coreset": "0.02",
    "pixel_pct": "0.995 (a quantile: the 99.5th percentile)",
    "image_pct": "0.995 (a quantile: the 99.5th percentile)",
    "reservoir_max": "another value, held in memory (its default is not recorded in the service's documentation)",
}
"""The service's old ``build_bank.py`` defaults where ours differ (``--help`` and the README show both)."""


def as_percentile(name: str, value: float) -> float:
    """``--pixel_pct``/``--image_pct`` as a percentile in (0, 100].

    Values in (0, 1] are quantiles, as the old ``build_bank.py`` read them (0.995 = the
    99.5th percentile); values in (1, 100] are percentiles. A quantile reading is logged
    (INFO), so an old command line shows how it was understood. Raises ``BankBuildError`` outside (0, 100].
    """
    if not (math.isfinite(value) and 0 < value <= 100):
        raise BankBuildError(f"{name} must be a quantile in (0, 1] or a percentile in (1, 100] (got {value})")
    if value <= 1:
        log.info("%s %g read as a quantile: the %gth percentile", name, value, round(value * 100, 6))
        return round(value * 100, 6)
    log.debug("%s %g read as a percentile", name, value)  # the plain reading: not worth a line per build
    return float(value)


@dataclass
class BuildOptions:
    """How one bank is built. Defaults (measured, see the README) differ from the old ``build_bank.py``.

    ============== ====================== ==========================
    option         default here           old ``build_bank.py``
    ============== ====================== ==========================
    layers         layer2, layer3         layer2, layer3, layer4
    coreset        0.05                   0.02
    pixel_pct      99.5 (= 0.995)         0.995 (quantile)
    image_pct      99.5 (= 0.995)         0.995 (quantile)
    reservoir_max  200,000 patches        another value, in memory
    ============== ====================== ==========================

    ``coreset``: a ratio of patches in (0, 1] or an absolute count (> 1).
    ``weights``: ``"imagenet"`` (torchvision ResNet50 IMAGENET1K_V2, the service's, from its cache or the
    network), a path to a ``state_dict`` checkpoint, or ``"random"`` (seeded random init,
    for offline demos and tests only; such a bank is labelled as random in its config).
    ``holdout``: fraction of normal images held out to calibrate tau (at least one image).
    ``final_coreset``: ``"extend"`` continues the calibration bank's greedy over all normal
    patches (same k-center greedy, fewer picks to search), ``"fresh"`` restarts it.
    ``batch_size``: images per forward pass of same-size images; 0 picks 4 on CPU (about 15 %
    faster per image than one at a time, measured on 512 px images) and 8 on CUDA.
    ``feature_cache``: directory of the per-image feature cache (:mod:`.feature_cache`; ``""`` = none),
    bounded to ``feature_cache_gb``: a rebuild extracts only the images it has not seen; the bank is the same.
    """

    shorter: int = 512
    stride: int = 2
    layers: list[str] = field(default_factory=lambda: ["layer2", "layer3"])
    coreset: float = 0.05
    reservoir_max: int = 200_000
    seed: int = 0
    pixel_pct: float = 99.5
    image_pct: float = 99.5
    weights: str = "imagenet"
    device: str = "auto"
    batch_size: int = 0
    holdout: float = 0.2
    projection_dim: int = 128
    final_coreset: str = "extend"
    feature_cache: str = ""
    feature_cache_gb: float = 4.0

    def __post_init__(self) -> None:
        self.layers = parse_layers(self.layers)
        problems = []
        if self.shorter < 32:
            problems.append(f"shorter must be >= 32 (got {self.shorter})")
        if self.stride < 1:
            problems.append(f"stride must be >= 1 (got {self.stride})")
        if not (self.coreset > 0 and math.isfinite(self.coreset)):
            problems.append(f"coreset must be a ratio in (0, 1] or a count > 1 (got {self.coreset})")
        elif self.coreset > 1 and self.coreset != int(self.coreset):
            problems.append(f"coreset above 1 is a patch count and must be whole (got {self.coreset})")
        if self.reservoir_max < 1:
            problems.append(f"reservoir_max must be >= 1 (got {self.reservoir_max})")
        for name in ("pixel_pct", "image_pct"):
            try:
                setattr(self, name, as_percentile(name, float(getattr(self, name))))
            except BankBuildError as exc:
                problems.append(str(exc))
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device must be auto, cpu or cuda (got {self.device!r})")
        if self.batch_size < 0:
            problems.append(f"batch_size must be >= 0 (got {self.batch_size})")
        if not 0 < self.holdout < 1:
            problems.append(f"holdout must be in (0, 1) (got {self.holdout})")
        if self.final_coreset not in ("extend", "fresh"):
            problems.append(f"final_coreset must be extend or fresh (got {self.final_coreset!r})")
        if not (self.feature_cache_gb >= 0 and math.isfinite(self.feature_cache_gb)):
            problems.append(f"feature_cache_gb must be >= 0 (got {self.feature_cache_gb}; 0 turns the cache off)")
        if self.projection_dim < 1:
            problems.append(f"projection_dim must be >= 1 (got {self.projection_dim})")
        if problems:
            raise BankBuildError("invalid PatchCore options: " + "; ".join(problems))

    def coreset_size(self, num_patches: int) -> int:
        """Bank rows for ``num_patches`` candidates: ``ceil(ratio * n)`` or the count, at most ``n``, at least 1."""
        if self.coreset <= 1:
            wanted = math.ceil(self.coreset * num_patches)
        else:
            wanted = int(self.coreset)
        return max(1, min(num_patches, wanted))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
