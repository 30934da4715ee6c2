"""ResNet-50 patch features exactly as the service's query path computes them (steps 3-6).

For a batch of RGB images in [0, 1] (decoded by :mod:`.images`): normalise with ImageNet
mean/std, run torchvision ``resnet50`` only as deep as the deepest requested layer, upsample
each layer's output bilinearly (``align_corners=False``) to the first (shallowest) layer's
grid, *then* L2-normalise it over channels, concatenate over channels, keep every
``stride``-th cell in both axes and L2-normalise again. One image gives ``[rows * cols, D]``
patch features in row-major grid order.

``imagenet`` weights are torchvision's ``ResNet50_Weights.IMAGENET1K_V2``, the service's.
"""

from __future__ import annotations

import copy as _copy
import hashlib
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from inspection_refresh.clip.weights import file_sha256  # memoised: the same file is hashed once
from inspection_refresh.patchcore.options import BankBuildError, feature_dim, parse_layers

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
IMAGENET_WEIGHTS = "IMAGENET1K_V2"
"""The torchvision weights the service's ResNet-50 uses (not V1: other numbers entirely)."""
POOLING = ("each layer upsampled bilinearly (align_corners=False) to the first layer's grid, then "
           "L2-normalised over channels, concatenated, every stride-th cell kept, L2-normalised again")


def load_resnet50(weights: str, seed: int = 0, layers: list[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A torchvision ``resnet50`` in eval mode and a descriptor of its weights for ``bank_config.json``.

    ``weights``: ``"imagenet"`` (``ResNet50_Weights.IMAGENET1K_V2`` from torchvision's cache,
    downloaded there when missing), ``"random"`` (initialised with ``torch.manual_seed(seed)``;
    not for production), or the path of a ``state_dict`` checkpoint (optionally wrapped as
    ``{"state_dict": ...}``; keys of stages deeper than the deepest of ``layers``, and ``fc``,
    may be absent). The descriptor always has ``name`` and the ``sha256`` of what was loaded.
    Raises ``BankBuildError`` saying what to pass instead when the weights cannot be had.
    """
    deepest = parse_layers(layers or ["layer4"])[-1]
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = torchvision.models.resnet50(weights=None)
        descriptor = {
            "name": "random",
            "seed": seed,
            "sha256": _state_sha256(model),
            "sha256_of": "state_dict tensors in key order",
            "note": "RANDOM initialisation, not ImageNet: for offline demos and tests only; "
            "the service assumes ImageNet weights",
        }
        log.warning("using RANDOM backbone weights (seed %d): this bank is for demos/tests, not production", seed)
    elif weights == "imagenet":
        path = imagenet_checkpoint_path()
        if not path.is_file():
            _download_imagenet_weights(path)
        model, descriptor = _from_checkpoint(path, deepest)
        enum = getattr(torchvision.models.ResNet50_Weights, IMAGENET_WEIGHTS)
        expected_prefix = path.name.rsplit("-", 1)[-1].split(".")[0]
        descriptor = {"name": "imagenet", "torchvision_weights": f"ResNet50_Weights.{IMAGENET_WEIGHTS}",
                      "url": enum.url, "file": path.name, "path": descriptor["path"],
                      "sha256": descriptor["sha256"], "sha256_of": "file",
                      "official_file": descriptor["sha256"].startswith(expected_prefix)}
        if not descriptor["official_file"]:
            log.warning("%s does not carry torchvision's published hash (sha256 %s..., expected %s...): it is "
                        "not the official %s file; the service's features will differ unless it loads the same file",
                        path, descriptor["sha256"][:8], expected_prefix, IMAGENET_WEIGHTS)
    else:
        model, descriptor = _from_checkpoint(Path(weights), deepest)
    return model.eval(), descriptor


def imagenet_checkpoint_path() -> Path:
    """Where torchvision keeps the ``IMAGENET1K_V2`` file: ``$TORCH_HOME/hub/checkpoints/resnet50-11ad3fa6.pth``."""
    enum = getattr(torchvision.models.ResNet50_Weights, IMAGENET_WEIGHTS)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(enum.url).path).name


def _download_imagenet_weights(path: Path) -> None:
    enum = getattr(torchvision.models.ResNet50_Weights, IMAGENET_WEIGHTS)
    try:
        enum.get_state_dict(progress=False, check_hash=True)  # downloads into torch.hub's cache, hash-checked
    except Exception as exc:  # URLError, hash mismatch, unwritable cache, ...
        raise BankBuildError(
            f"could not load torchvision ResNet50 {enum.name} weights ({exc}); they come from "
            f"{enum.url} into {path}. Offline: copy that file there, "
            "or pass --weights /path/to/resnet50_state_dict.pth, or --weights random for a demo bank"
        ) from exc


def _state_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _from_checkpoint(path: Path, deepest: str) -> tuple[nn.Module, dict[str, Any]]:
    if not path.is_file():
        raise BankBuildError(
            f"weights file {path} does not exist; pass an existing resnet50 state_dict file, "
            "'imagenet' or 'random'"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BankBuildError(f"could not read weights file {path} as a torch state_dict: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BankBuildError(f"weights file {path} holds a {type(state).__name__}, not a resnet50 state_dict")
    model = torchvision.models.resnet50(weights=None)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: another architecture
        raise BankBuildError(f"weights file {path} does not fit torchvision resnet50: {exc}") from exc
    unused = ("fc.",) + tuple(f"{name}." for name in _STAGES[_STAGES.index(deepest) + 1 :])
    missing = [key for key in result.missing_keys if not key.startswith(unused)]
    if missing or result.unexpected_keys:
        raise BankBuildError(
            f"weights file {path} does not fit torchvision resnet50: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model, {"name": "checkpoint", "path": str(path.resolve()), "sha256": file_sha256(path),
                   "sha256_of": "file", "unused_keys_absent": len(result.missing_keys)}


class PatchFeatureExtractor(nn.Module):
    """Backbone truncated after the deepest requested layer, plus the contract's patch pooling.

    The stages are prepared for fast inference without changing what they compute: every
    eval-mode BatchNorm, an affine map, is folded into the convolution before it, and
    activations use the channels_last memory format, which oneDNN and cuDNN run without
    layout conversions; only the kept cells of each layer are normalised and concatenated.
    Results match the plain computation up to float rounding (~1e-7 on the normalised
    features). ``copy=False`` folds the caller's backbone in place instead of a copy of it
    (saves one model's memory when the caller drops the backbone anyway).
    """

    def __init__(self, backbone: nn.Module, layers: list[str], stride: int, copy: bool = True) -> None:
        super().__init__()
        self.layers = parse_layers(layers)
        self.stride = stride
        self.feature_dim = feature_dim(self.layers)
        last = _STAGES.index(self.layers[-1])
        stages = nn.ModuleDict((name, getattr(backbone, name)) for name in _STAGES[: last + 1])
        stages = _copy.deepcopy(stages) if copy else stages
        self.stages = _fold_batchnorms(stages.eval()).to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.eval()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 1] -> ``[B, P, D]`` L2-normalised patch features."""
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        maps = []
        for name, stage in self.stages.items():
            x = stage(x)
            if name in self.layers:
                maps.append(x)
        grid = maps[0].shape[-2:]
        # Upsample first, normalise second: the service's order (the other gives other vectors).
        # Normalising is per cell, so only the kept cells need it: same values, a quarter of the work.
        kept = (slice(None), slice(None), slice(None, None, self.stride), slice(None, None, self.stride))
        maps = [F.normalize((m if m.shape[-2:] == grid else
                             F.interpolate(m, size=grid, mode="bilinear", align_corners=False))[kept], dim=1)
                for m in maps]
        feats = F.normalize(torch.cat(maps, dim=1), dim=1)
        return feats.permute(0, 2, 3, 1).reshape(feats.shape[0], -1, feats.shape[1])


def _fold_batchnorms(stages: nn.ModuleDict) -> nn.ModuleDict:
    """Fold each BatchNorm of torchvision's ResNet stem and Bottleneck blocks into its convolution, in place."""
    stages["conv1"] = fuse_conv_bn_eval(stages["conv1"], stages["bn1"])
    stages["bn1"] = nn.Identity()
    for name, stage in stages.items():
        if not name.startswith("layer"):
            continue
        for block in stage:
            for i in (1, 2, 3):
                setattr(block, f"conv{i}", fuse_conv_bn_eval(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
                setattr(block, f"bn{i}", nn.Identity())
            if block.downsample is not None:
                block.downsample = nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))
    return stages


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU raises ``BankBuildError``.

    On CUDA this turns TF32 off for convolutions and matmuls (process-wide): TF32 keeps 10
    mantissa bits and would make the bank differ from full float32 extraction.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BankBuildError(f"--device {device} requested but CUDA is not available here; "
                                 "use --device cpu or auto")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device(device)


def patch_grid(width: int, height: int, first_layer: str, stride: int) -> tuple[int, int]:
    """``(rows, cols)`` of sampled patches for an input of ``width x height`` (ResNet conv arithmetic).

    Every stride-2 stage (conv1, maxpool, then layer2..4) maps ``n`` to ``(n - 1) // 2 + 1``.
    """
    halvings = 2 + _STAGES.index(first_layer) - _STAGES.index("layer1")
    rows, cols = height, width
    for _ in range(halvings):
        rows, cols = (rows - 1) // 2 + 1, (cols - 1) // 2 + 1
    return -(-rows // stride), -(-cols // stride)
