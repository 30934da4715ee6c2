"""The service's image key layout (CONTRACT.md) and which objects count as images.

* normal images: ``images/normal/{product_id}/{file_name}``
* defect images: ``images/defect/{product_id}_{defect_type_id}/{file_name}``,
  file names ``{product_code}_{defect_code}_{seq}.{ext}``
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from inspection_refresh.storage import ObjectInfo

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
NORMAL_PREFIX = "images/normal/"
DEFECT_PREFIX = "images/defect/"

_DEFECT_FOLDER = re.compile(r"^(?P<product_id>\d+)_(?P<defect_type_id>\d+)$")
_FILE_NAME = re.compile(r"^(?P<product_code>[^_]+)_(?P<defect_code>[^_]+)_(?P<seq>[^.]+)$")


def reject_reason(obj: ObjectInfo) -> str | None:
    """Why an object under an image prefix is not indexed, or ``None`` if it is an image candidate.

    Folder markers, zero-byte objects and non-image extensions are rejected here;
    corrupt image bodies are found when decoding.
    """
    if obj.is_folder_marker:
        return "folder marker"
    suffix = PurePosixPath(obj.key).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        return f"not an image file ({suffix or 'no extension'}); expected one of {', '.join(sorted(IMAGE_SUFFIXES))}"
    if obj.size == 0:
        return "empty object (0 bytes)"
    return None


@dataclass(frozen=True)
class ImageKey:
    """What the key itself says about an image."""

    key: str
    image_type: str  # "normal" | "defect" | "other"
    file_name: str
    product_id: int | None = None
    defect_type_id: int | None = None
    product_code: str | None = None
    defect_code: str | None = None


def parse_image_key(key: str) -> ImageKey:
    """Parse a key of the service's layout; unknown layouts keep only the file name."""
    path = PurePosixPath(key)
    file_name = path.name
    parts = path.parts
    if key.startswith(NORMAL_PREFIX) and len(parts) >= 4 and parts[2].isdigit():
        return ImageKey(key, "normal", file_name, product_id=int(parts[2]))
    if key.startswith(DEFECT_PREFIX) and len(parts) >= 4:
        folder = _DEFECT_FOLDER.match(parts[2])
        name = _FILE_NAME.match(path.stem)
        return ImageKey(
            key, "defect", file_name,
            product_id=int(folder["product_id"]) if folder else None,
            defect_type_id=int(folder["defect_type_id"]) if folder else None,
            product_code=name["product_code"] if name else None,
            defect_code=name["defect_code"] if name else None,
        )
    return ImageKey(key, "other", file_name)
