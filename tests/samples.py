"""Small JPEGs of the demo's synthetic products, for tests that upload images."""

from __future__ import annotations

import io


def sample_jpeg(product_index: int, seed: int, defect: str | None = None, size=(256, 256)) -> bytes:
    """A normal (or, with ``defect``, a defective) image of product ``product_index`` as JPEG bytes."""
    from inspection_refresh.dev.samples import render_defect, render_normal

    image = render_defect(product_index, seed, defect, size=size) if defect else render_normal(
        product_index, seed, size=size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
