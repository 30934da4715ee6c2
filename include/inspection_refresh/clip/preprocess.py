"""The service's CLIP preprocessing of one image file (CONTRACT.md), the single source of truth.

``PIL.Image.open`` -> ``convert("RGB")`` -> squash to 224x224 with ``Image.BILINEAR``
-> float in [0, 1] (``/ 255``) -> subtract CLIP mean, divide by CLIP std; the model
then runs ``encode_image`` and the vector is divided by its L2 norm (float32).

:func:`preprocess_image` is the whole of it. The batched path
(:mod:`inspection_refresh.clip.batched`) splits it into a uint8 half,
:func:`load_resized` (in the decode workers), and an elementwise float half,
:func:`normalize_uint8` (in the model lanes), which give bit-identical tensors; a
unit test checks that. Bump :data:`inspection_refresh.clip.weights.PREPROCESS_VERSION`
whenever anything here changes what a vector is.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGE_SIZE = (224, 224)
"""(width, height) the service squashes every image to."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
