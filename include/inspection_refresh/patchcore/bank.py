"""The bank directory the service loads (CONTRACT.md): writing it atomically and validating it.

Files: ``memory_bank.pt`` (``torch.save`` of a float32 ``Tensor[M, D]``),
``bank_config.json``, ``tau.json`` (``{"pixel": float, "image": float}``) and
``score_histogram.png``; the builder adds side files the service does not read
(``quality.json``, :mod:`.quality`), which publishing copies along. Every file is
written as ``<name>.tmp`` first and renamed into place only when all of them were
written, so a failed build never leaves a file with a final name behind.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inspection_refresh.patchcore.options import EXTRACTOR_VERSION, BankValidationError, feature_dim, parse_layers

BANK_FILE = "memory_bank.pt"
CONFIG_FILE = "bank_config.json"
TAU_FILE = "tau.json"
HISTOGRAM_FILE = "score_histogram.png"
BANK_FILES = (BANK_FILE, CONFIG_FILE, TAU_FILE, HISTOGRAM_FILE)
SERVICE_IMAGENET_WEIGHTS = "ResNet50_Weights.IMAGENET1K_V2"


def write_bank(out_dir: Path, bank: np.ndarray, config: dict[str, Any], tau: dict[str, float],
               plot: Callable[[Path], None], side_files: Mapping[str, Any] | None = None) -> list[Path]:
    """Write the four bank files into ``out_dir`` (created if missing); returns their paths.

    ``plot(path)`` draws the histogram PNG at ``path``. ``side_files``: more JSON files,
    ``{file name: document}``, written in the same all-or-nothing step. On any error the
    ``*.tmp`` files are removed and nothing under a final name has been replaced.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    side_files = dict(side_files or {})
    staged = {name: out_dir / f"{name}.tmp" for name in (*BANK_FILES, *side_files)}
    try:
        for name, document in side_files.items():
            staged[name].write_text(json.dumps(document, indent=2) + "\n")
        torch.save(torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)), staged[BANK_FILE])
        staged[CONFIG_FILE].write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        staged[TAU_FILE].write_text(json.dumps({"pixel": float(tau["pixel"]), "image": float(tau["image"])}) + "\n")
        plot(staged[HISTOGRAM_FILE])
        for name, tmp in staged.items():
            os.replace(tmp, out_dir / name)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return [out_dir / name for name in staged]


def validate_bank(bank_dir: Path | str, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a bank directory as the service would load it; returns facts about it.

    Checks: all files present; ``bank_config.json`` records how the features were extracted
    (``extractor_version``, ``decoder``, ``weights`` with a sha256) and that is this package's
    extraction, the service's query path (a bank without that record is refused as "extraction
    unknown"; ``imagenet`` weights other than IMAGENET1K_V2 are refused); ``layers``/``shorter``/
    ``stride`` (and any other key of ``expected``, e.g. ``weights``: ``"imagenet"``, ``"random"``
    or a checkpoint path, whose file must still have the recorded sha256) equal ``expected``'s;
    ``memory_bank.pt`` is a finite float32 ``Tensor[M, D]`` with ``M >= 1`` and unit-norm rows,
    ``D`` matching ``layers``; ``tau.json`` has finite ``pixel`` and ``image`` > 0.
    Raises ``BankValidationError`` saying what is wrong.
    Returns ``{"bank_dir", "bank_size", "feature_dim", "layers", "shorter", "stride", "tau", "weights",
    "extractor_version"}``.
    """
    import torch

    bank_dir = Path(bank_dir)
    missing = [name for name in BANK_FILES if not (bank_dir / name).is_file()]
    if missing:
        raise BankValidationError(f"bank directory {bank_dir} lacks {', '.join(missing)}")
    config = _read_json(bank_dir / CONFIG_FILE)
    tau = _read_json(bank_dir / TAU_FILE)
    for key in ("layers", "shorter", "stride"):
        if key not in config:
            raise BankValidationError(f"{bank_dir / CONFIG_FILE} lacks {key!r}, which the service reads")
    try:
        layers = parse_layers(config["layers"])
    except Exception as exc:
        raise BankValidationError(f"{bank_dir / CONFIG_FILE}: bad layers {config['layers']!r}: {exc}") from exc
    _check_extraction(bank_dir / CONFIG_FILE, config)
    for key, value in (expected or {}).items():
        actual, wanted = _compared(key, value, config, layers)
        if actual != wanted:
            raise BankValidationError(f"{bank_dir / CONFIG_FILE}: {key} is {actual!r}, expected {wanted!r}")

    try:
        bank = torch.load(bank_dir / BANK_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BankValidationError(f"cannot load {bank_dir / BANK_FILE} with torch.load: {exc}") from exc
    if not isinstance(bank, torch.Tensor) or bank.dtype != torch.float32 or bank.dim() != 2 or bank.shape[0] < 1:
        kind = (f"{bank.dtype} tensor of shape {tuple(bank.shape)}" if isinstance(bank, torch.Tensor)
                else type(bank).__name__)
        raise BankValidationError(f"{bank_dir / BANK_FILE} holds a {kind}; expected a float32 Tensor[M >= 1, D]")
    dim = feature_dim(layers)
    if bank.shape[1] != dim or config.get("feature_dim", dim) != dim:
        raise BankValidationError(
            f"{bank_dir / BANK_FILE} has {bank.shape[1]} columns, config feature_dim "
            f"{config.get('feature_dim')}; layers {layers} give {dim}"
        )
    if not bool(torch.isfinite(bank).all()):
        raise BankValidationError(f"{bank_dir / BANK_FILE} contains NaN or infinite values")
    norms = bank.norm(dim=1)
    if float((norms - 1).abs().max()) > 1e-3:
        raise BankValidationError(f"{bank_dir / BANK_FILE} rows are not L2-normalised (norms {float(norms.min()):.4f}"
                                  f"..{float(norms.max()):.4f}); features were not extracted as the contract says")
    for key in ("pixel", "image"):
        value = tau.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise BankValidationError(f"{bank_dir / TAU_FILE}: {key!r} is {value!r}; expected a finite number > 0")
    if "bank_size" in config and config["bank_size"] != bank.shape[0]:
        raise BankValidationError(f"{bank_dir / CONFIG_FILE} says bank_size {config['bank_size']}, "
                                  f"{BANK_FILE} has {bank.shape[0]} rows")
    return {
        "bank_dir": str(bank_dir),
        "bank_size": int(bank.shape[0]),
        "feature_dim": int(bank.shape[1]),
        "layers": layers,
        "shorter": config["shorter"],
        "stride": config["stride"],
        "tau": {"pixel": float(tau["pixel"]), "image": float(tau["image"])},
        "weights": config.get("weights"),
        "extractor_version": config["extractor_version"],
    }


def _check_extraction(config_path: Path, config: dict[str, Any]) -> None:
    """The bank's features were made by the service's query path, with known weights."""
    from inspection_refresh.patchcore.images import DECODER

    weights = config.get("weights")
    missing = [key for key in ("extractor_version", "decoder") if key not in config]
    if not isinstance(weights, dict) or "sha256" not in weights:
        missing.append("weights with sha256")
    if missing:
        raise BankValidationError(
            f"{config_path}: extraction unknown (no {', '.join(missing)}): the bank was made by an older "
            "builder or another tool, so its features may not match the service's query path; rebuild it "
            "with this package's builder")
    if config["extractor_version"] != EXTRACTOR_VERSION or config["decoder"] != DECODER:
        raise BankValidationError(
            f"{config_path}: features were extracted by {config['extractor_version']!r} with "
            f"{config['decoder']!r}; the service's query path is {EXTRACTOR_VERSION!r} with {DECODER!r}: rebuild it")
    if weights.get("name") == "imagenet" and weights.get("torchvision_weights") != SERVICE_IMAGENET_WEIGHTS:
        raise BankValidationError(
            f"{config_path}: built with {weights.get('torchvision_weights')!r}; the service's ResNet-50 uses "
            f"{SERVICE_IMAGENET_WEIGHTS}, so distances and tau would be wrong: rebuild it")


def _compared(key: str, value: Any, config: dict[str, Any], layers: list[str]) -> tuple[Any, Any]:
    """``(actual, wanted)`` for one ``expected`` item; ``weights`` compares the name or checkpoint path."""
    if key == "layers":
        return layers, parse_layers(value)
    if key == "weights":
        weights = config.get("weights") if isinstance(config.get("weights"), dict) else {}
        if value in ("imagenet", "random"):
            return weights.get("name"), value
        path = Path(value).resolve()
        if weights.get("path") == str(path) and path.is_file():
            from inspection_refresh.clip.weights import file_sha256

            return f"{path} (sha256 {weights.get('sha256')})", f"{path} (sha256 {file_sha256(path)})"
        return weights.get("path"), str(path)
    return config.get(key), value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BankValidationError(f"cannot read {path} as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BankValidationError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data

