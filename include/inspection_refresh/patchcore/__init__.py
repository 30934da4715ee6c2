"""PatchCore memory banks in the service's layout (CONTRACT.md, "PatchCore anomaly detection").

Components, each usable and testable alone:

* :mod:`.options`     -- build options, defaults, layer names and the errors raised
* :mod:`.images`      -- list and load images as the contract says (RGB, short side resize)
* :mod:`.features`    -- ResNet50 patch features (extract once per image)
* :mod:`.coreset`     -- greedy k-center coreset on a random projection
* :mod:`.reservoir`   -- bounded-memory uniform sample of patch features
* :mod:`.calibration` -- nearest-neighbour scores (FAISS), tau, AUROC, histogram
* :mod:`.bank`        -- write the bank files atomically and validate a bank directory
* :mod:`.product`     -- one product end to end (or every product under a root)
* :mod:`.build`       -- the ``build_bank.py``-compatible CLI (``inspection-build-bank``)

Importing this package is cheap: torch, torchvision and faiss are imported only
by the modules that use them, which only the builder imports. The names below
resolve lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BankBuildError",
    "BankValidationError",
    "BuildOptions",
    "build_product",
    "build_root",
    "validate_bank",
]

_LAZY = {
    "BankBuildError": "options",
    "BankValidationError": "options",
    "BuildOptions": "options",
    "build_product": "product",
    "build_root": "product",
    "validate_bank": "bank",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
