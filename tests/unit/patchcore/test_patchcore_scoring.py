"""The reference scorer scores a published bank exactly as the service's step 7 says."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from inspection_refresh.dev.samples import render_defect
from inspection_refresh.patchcore.build import build_product
from inspection_refresh.patchcore.options import BuildOptions
from inspection_refresh.patchcore.scoring import ReferenceScorer
from tests.unit.patchcore.test_patchcore_features import random_resnet, service_features


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory, product_dirs: tuple[Path, Path]) -> tuple[Path, Path]:
    """A bank built with a checkpoint file, so the test's own model can load the same weights."""
    directory = tmp_path_factory.mktemp("scoring")
    torch.save(random_resnet(6).state_dict(), directory / "resnet50.pth")
    build_product(product_dirs[0], directory / "bank",
                  BuildOptions(weights=str(directory / "resnet50.pth"), shorter=96, coreset=0.3))
    return directory / "bank", directory / "resnet50.pth"


def service_score(path: Path, bank_dir: Path, model: torch.nn.Module) -> tuple[float, np.ndarray]:
    """Step 7, written out: IndexFlatL2 nearest row, square root, 99th percentile."""
    config = json.loads((bank_dir / "bank_config.json").read_text())
    rows = torch.load(bank_dir / "memory_bank.pt").numpy()
    index = faiss.IndexFlatL2(rows.shape[1])
    index.add(rows)
    feats = service_features(path, model, config["layers"], config["shorter"], config["stride"]).numpy()
    squared, _ = index.search(feats, 1)
    distances = np.sqrt(squared[:, 0])
    return float(np.percentile(distances, 99)), distances


def test_reference_scorer_matches_the_service_step_by_step(bank: tuple[Path, Path], product_dirs: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    bank_dir, checkpoint = bank
    scorer = ReferenceScorer.from_bank_dir(bank_dir, device="cpu")  # weights: the checkpoint the config records
    tau = json.loads((bank_dir / "tau.json").read_text())
    model = random_resnet(6)
    render_defect(0, 77, "hole", (170, 128)).save(tmp_path / "defect.png")
    images = [*sorted(product_dirs[0].iterdir())[:2], *sorted(product_dirs[1].iterdir())[:2], tmp_path / "defect.png"]

    for path in images:
        result = scorer.score(path)
        expected, distances = service_score(path, bank_dir, model)
        assert result.score == pytest.approx(expected, abs=1e-5)
        assert float(np.abs(result.patch_distances.ravel() - distances).max()) <= 1e-5
        assert result.is_anomalous == (result.score > tau["image"])
        assert np.array_equal(result.anomaly_map, result.patch_distances > tau["pixel"])
    assert Path(json.loads((bank_dir / "bank_config.json").read_text())["weights"]["path"]) == checkpoint.resolve()


def test_scorer_uses_the_service_defaults_for_missing_config_keys(bank: tuple[Path, Path], tmp_path: Path) -> None:
    bank_dir, checkpoint = bank
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("memory_bank.pt", "tau.json"):
        (bare / name).write_bytes((bank_dir / name).read_bytes())
    (bare / "bank_config.json").write_text(json.dumps({"layers": ["layer2", "layer3"], "shorter": 96}))
    scorer = ReferenceScorer.from_bank_dir(bare, weights=str(checkpoint), device="cpu")
    assert scorer.extractor.stride == 2 and scorer.shorter == 96  # stride missing: the service's 2
    (bare / "bank_config.json").write_text(json.dumps({"shorter": 96}))
    with pytest.raises(ValueError, match="1536 columns; layers \\['layer2', 'layer3', 'layer4'\\] give 3584"):
        ReferenceScorer.from_bank_dir(bare, weights=str(checkpoint), device="cpu")  # layers missing: all three
