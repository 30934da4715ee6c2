"""CLIP gallery embedding and the service's index formats.

Modules (import them inside tasks; each imports torch / open_clip / faiss only
inside the functions that need them, and this package imports none of them):

- :mod:`.weights`    -- ``model_identity``, ``create_random_checkpoint``, ``is_random_checkpoint``
- :mod:`.preprocess` -- ``preprocess_image``: the service's preprocessing, the single source of truth
- :mod:`.model`      -- ``load_model``, ``LoadedModel``: the open_clip model, encoding batches to unit vectors
- :mod:`.batched`    -- the batched run: DataLoader workers decode, model lanes encode
- :mod:`.embed`      -- ``embed_files`` (reader -> model -> vectors, cache-aware), ``embed_image``; its
  names also include the preprocessing's and the model's, as before they moved out
- :mod:`.cache`      -- ``EmbeddingCache``: vectors by (image sha256, model identity), one SQLite file
- :mod:`.index`      -- ``write_index_files``, ``verify_index``, ``search`` (faiss_index.bin,
  index_data.pt, embeddings.pt + metadata.json, manifest.json)
- :mod:`.synthetic`  -- synthetic JPEGs for tests, demo and benchmark

``from inspection_refresh.clip import embed_files`` works too: names are resolved
lazily on first use, so importing the package stays cheap for DAG parsing.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EmbeddingCache": "cache",
    "default_cache_dir": "cache",
    "CLIPWeightsError": "model",
    "EmbedResult": "embed",
    "LoadedModel": "model",
    "embed_files": "embed",
    "embed_image": "embed",
    "load_model": "model",
    "preprocess_image": "preprocess",
    "IndexVerificationError": "index",
    "search": "index",
    "verify_index": "index",
    "write_index_files": "index",
    "create_random_checkpoint": "weights",
    "is_random_checkpoint": "weights",
    "model_identity": "weights",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
