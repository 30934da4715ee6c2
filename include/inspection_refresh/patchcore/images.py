"""Find and load images exactly as the contract says: RGB in [0, 1], short side resized to ``shorter``.

Resize method (recorded in ``bank_config.json`` as :data:`RESIZE_METHOD`): PIL bilinear
resampling (PIL's antialiasing filter), aspect ratio kept; the short side becomes
``shorter`` and the long side ``int(shorter * long / short)`` (truncated) -- the same
as ``torchvision.transforms.Resize(shorter)`` on a PIL image. An image whose short side
already equals ``shorter`` is not resampled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
RESIZE_METHOD = ("PIL bilinear, aspect kept, short side = shorter, long side = int(shorter * long / short) "
                 "(= torchvision Resize(shorter) on PIL)")


@dataclass(frozen=True)
class ImageInfo:
    """An image file whose header could be read, and its size after the short-side resize."""

    path: Path
    size: tuple[int, int]
    """``(width, height)`` after resizing."""


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """``(width, height)`` after resizing the short side to ``shorter`` (torchvision's rounding)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def list_images(directory: Path) -> list[Path]:
    """Image files (by suffix) directly in ``directory``, sorted by name; others are logged and skipped.

    Raises ``FileNotFoundError``/``NotADirectoryError`` naming the directory when it is missing.
    """
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"image directory {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory")
    found = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
        elif not path.name.startswith("."):
            log.info("skipping %s: not an image file (expected %s)", path, ", ".join(sorted(IMAGE_SUFFIXES)))
    return found


def probe(paths: list[Path], shorter: int) -> list[ImageInfo]:
    """Read only the headers; files PIL cannot identify are logged with their name and dropped."""
    infos = []
    for path in paths:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("skipping unreadable image %s: %s", path, exc)
            continue
        if width < 1 or height < 1:
            log.warning("skipping empty image %s (%dx%d)", path, width, height)
            continue
        infos.append(ImageInfo(path, resized_size(width, height, shorter)))
    return infos


def load_rgb(path: Path, shorter: int) -> np.ndarray:
    """``float32 [H, W, 3]`` in [0, 1], short side resized to ``shorter``.

    Raises ``OSError`` (or ``PIL.Image.DecompressionBombError``) when the file cannot be decoded.
    """
    with Image.open(path) as img:
        img = img.convert("RGB")
        size = resized_size(*img.size, shorter)
        if size != img.size:
            img = img.resize(size, Image.BILINEAR)
        array = np.asarray(img, dtype=np.float32)
    array *= np.float32(1.0 / 255.0)
    return array
