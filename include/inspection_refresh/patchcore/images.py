"""Find and decode images exactly as the service's query path does (steps 1-3 of its contract).

1. Decode with OpenCV, ``cv2.imread(path, cv2.IMREAD_COLOR)``: 8-bit BGR, EXIF orientation
   applied, grey expanded to 3 channels, 16-bit reduced to 8 bits the way OpenCV does it,
   alpha dropped.
2. Resize only when ``min(h, w) != shorter``: the short side becomes ``shorter``, the long
   side ``int(long * shorter / short)`` (truncated), with ``cv2.INTER_AREA``.
3. BGR to RGB and ``float32 / 255`` (ImageNet mean/std normalisation is done by the feature
   extractor, on the device).

The exact decoder and resize are recorded in ``bank_config.json`` as :data:`DECODER` and
:data:`RESIZE_METHOD`; a bank whose record differs is refused by ``validate_bank``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
DECODER = "cv2.imread(path, cv2.IMREAD_COLOR)"
RESIZE_METHOD = ("cv2.resize INTER_AREA when min(h, w) != shorter; short side = shorter, "
                 "long side = int(long * shorter / short)")

# EXIF orientations 5-8 rotate by 90 degrees: OpenCV applies them, so width and height swap.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageDecodeError(OSError):
    """OpenCV could not decode an image file; the message names the file."""


@dataclass(frozen=True)
class ImageInfo:
    """An image file whose header could be read, and its expected size after the short-side resize."""

    path: Path
    size: tuple[int, int]
    """``(width, height)`` after resizing (used to batch same-size images and to size buffers)."""


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """``(width, height)`` after the service's resize rule (unchanged when the short side is ``shorter``)."""
    if min(width, height) == shorter:
        return width, height
    if width <= height:
        return shorter, int(height * shorter / width)
    return int(width * shorter / height), shorter


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
    """Read only the headers (PIL, cheap); files that cannot be identified are logged with their name and dropped.

    The size accounts for EXIF rotation, as OpenCV's decoder does. Decompression bombs
    (PIL's pixel limit) are refused here, before any full decode.
    """
    infos = []
    for path in paths:
        try:
            with Image.open(path) as img:
                width, height = img.size
                if _exif_orientation(img) in _TRANSPOSING_ORIENTATIONS:
                    width, height = height, width
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("skipping unreadable image %s: %s", path, exc)
            continue
        if width < 1 or height < 1:
            log.warning("skipping empty image %s (%dx%d)", path, width, height)
            continue
        infos.append(ImageInfo(path, resized_size(width, height, shorter)))
    return infos


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF: OpenCV ignores it as well
        return 1


def load_rgb(path: Path, shorter: int) -> np.ndarray:
    """``float32 [H, W, 3]`` RGB in [0, 1], decoded and resized as the service does.

    Raises :class:`ImageDecodeError` naming the file when OpenCV cannot decode it.
    """
    import cv2

    _refuse_truncated_jpeg(path)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageDecodeError(f"OpenCV cannot decode {path}; check or replace the file")
    height, width = bgr.shape[:2]
    size = resized_size(width, height, shorter)
    if size != (width, height):
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    rgb /= np.float32(255.0)  # divided, not multiplied by 1/255: the same float32 values as the service
    return rgb


def _refuse_truncated_jpeg(path: Path) -> None:
    """OpenCV decodes a cut-off JPEG as a half-grey image without an error; such a file is corrupt input.

    Entropy-coded data never contains the end-of-image marker (FFD9) or a start-of-scan marker
    (FFDA), so a complete JPEG has an FFD9 after its last FFDA (an EXIF thumbnail's FFD9 comes
    before the main image's scans).
    """
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise ImageDecodeError(f"{path} is a truncated JPEG (it ends inside its image data); re-upload the file")
