"""Building a bank: the files the service loads, calibration on held-out images, errors, atomicity."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from inspection_refresh.patchcore import bank as bank_module
from inspection_refresh.patchcore import build as build_module
from inspection_refresh.patchcore.bank import BANK_FILES, validate_bank
from inspection_refresh.patchcore.build import build_product
from inspection_refresh.patchcore.features import load_resnet50
from inspection_refresh.patchcore.options import BankBuildError, BankValidationError, BuildOptions


@pytest.fixture(scope="module")
def built(product_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, fast: dict) -> tuple[Path, dict]:
    ok, defect = product_dirs
    out = tmp_path_factory.mktemp("built") / "bank"
    summary = build_product(ok, out, BuildOptions(**fast, coreset=0.25), [defect], product="P0")
    return out, summary


def test_outputs_load_as_the_service_loads_them(built: tuple[Path, dict]) -> None:
    out, summary = built
    bank = torch.load(out / "memory_bank.pt", map_location="cpu")
    config = json.loads((out / "bank_config.json").read_text())
    tau = json.loads((out / "tau.json").read_text())

    assert isinstance(bank, torch.Tensor) and bank.dtype == torch.float32 and bank.dim() == 2
    assert bank.shape == (summary["bank_size"], 1536)
    assert torch.allclose(bank.norm(dim=1), torch.ones(bank.shape[0]), atol=1e-5)
    assert set(tau) == {"pixel", "image"} and tau["pixel"] > 0 and tau["image"] > 0
    assert config["layers"] == ["layer2", "layer3"] and config["shorter"] == 96 and config["stride"] == 2
    assert config["backbone"] == "resnet50" and config["weights"]["name"] == "random"
    assert "RANDOM" in config["weights"]["note"]
    assert config["coreset"]["method"] == "greedy_k_center" and config["coreset"]["projection_dim"] == 128
    assert config["feature_dim"] == 1536 and config["bank_size"] == bank.shape[0] and config["num_images"] == 8
    assert config["extractor_version"] and config["input"]["resize"].startswith("cv2.resize INTER_AREA")
    calibration = config["calibration"]
    assert calibration["num_holdout_images"] == 2 and calibration["num_calibration_bank_images"] == 6
    assert calibration["tau"] == tau and calibration["num_defect_images"] == 3
    assert (out / "score_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == sorted((*BANK_FILES, "quality.json"))  # no *.tmp left over

    assert summary["status"] == "completed" and summary["product"] == "P0" and summary["num_images"] == 8
    assert summary["tau"] == tau and 0.0 <= summary["auroc"] <= 1.0 and summary["out_dir"] == str(out)


def test_bank_is_the_coreset_of_all_normal_patches(built: tuple[Path, dict]) -> None:
    out, summary = built
    config = json.loads((out / "bank_config.json").read_text())
    # 8 images of 160x128 -> 120x96 -> layer2 grid 15x12 -> stride 2 -> 8x6 = 48 patches each.
    assert config["coreset"]["candidates"] == config["coreset"]["patches_seen"] == 8 * 48
    assert summary["bank_size"] == int(np.ceil(0.25 * 8 * 48))
    assert config["calibration"]["calibration_bank_size"] == int(np.ceil(0.25 * 6 * 48))


def test_validate_bank(built: tuple[Path, dict], tmp_path: Path) -> None:
    out, summary = built
    facts = validate_bank(out, {"layers": "layer2,layer3", "shorter": 96, "stride": 2})
    assert facts["bank_size"] == summary["bank_size"] and facts["feature_dim"] == 1536
    assert facts["tau"] == summary["tau"] and facts["layers"] == ["layer2", "layer3"]

    with pytest.raises(BankValidationError, match="shorter is 96, expected 512"):
        validate_bank(out, {"shorter": 512})
    assert validate_bank(out, {"weights": "random"})["weights"]["name"] == "random"
    with pytest.raises(BankValidationError, match="weights is 'random', expected 'imagenet'"):
        validate_bank(out, {"weights": "imagenet"})
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "tau.json").write_text(json.dumps({"pixel": float("nan"), "image": 1.0}))
    with pytest.raises(BankValidationError, match="'pixel' is nan"):
        validate_bank(broken)
    torch.save(torch.zeros(3, 1536, dtype=torch.float64), broken / "memory_bank.pt")
    with pytest.raises(BankValidationError, match="float64"):
        validate_bank(broken)
    (broken / "tau.json").unlink()
    with pytest.raises(BankValidationError, match="lacks tau.json"):
        validate_bank(broken)
    assert issubclass(BankValidationError, ValueError)


def test_validate_bank_refuses_other_or_unknown_extraction(built: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = built
    config = json.loads((out / "bank_config.json").read_text())

    def variant(name: str, **changes: object) -> Path:
        directory = tmp_path / name
        shutil.copytree(out, directory)
        edited = {**config, **changes}
        for key in [k for k, v in changes.items() if v is None]:
            del edited[key]
        (directory / "bank_config.json").write_text(json.dumps(edited))
        return directory

    # What the previous builder wrote: V1 weights, PIL decoding, normalise-then-upsample.
    v1 = {"name": "imagenet", "torchvision_weights": "ResNet50_Weights.IMAGENET1K_V1",
          "url": "https://download.pytorch.org/models/resnet50-0676ba61.pth", "sha256": "0676ba61" + "0" * 56}
    with pytest.raises(BankValidationError, match="IMAGENET1K_V1.*IMAGENET1K_V2"):
        validate_bank(variant("v1", weights=v1))
    with pytest.raises(BankValidationError, match="IMAGENET1K_V1.*IMAGENET1K_V2"):
        validate_bank(variant("v1_expected", weights=v1), {"weights": "imagenet"})
    with pytest.raises(BankValidationError, match="features were extracted by 'inspection_refresh.patchcore/1'"):
        validate_bank(variant("old_version", extractor_version="inspection_refresh.patchcore/1"))
    with pytest.raises(BankValidationError, match="extraction unknown \\(no extractor_version, decoder"):
        validate_bank(variant("old", extractor_version=None, decoder=None))
    with pytest.raises(BankValidationError, match="extraction unknown \\(no weights with sha256\\)"):
        validate_bank(variant("no_hash", weights={"name": "random", "seed": 0}))


def test_validate_bank_checks_the_checkpoint_file_is_unchanged(product_dirs: tuple[Path, Path], tmp_path: Path,
                                                              fast: dict) -> None:
    random_model, _ = load_resnet50("random", seed=1)
    checkpoint = tmp_path / "resnet50.pth"
    torch.save(random_model.state_dict(), checkpoint)
    build_product(product_dirs[0], tmp_path / "bank", BuildOptions(**{**fast, "weights": str(checkpoint)}))
    assert validate_bank(tmp_path / "bank", {"weights": str(checkpoint)})["weights"]["name"] == "checkpoint"

    state = random_model.state_dict()
    state["conv1.weight"] = state["conv1.weight"] * 2
    torch.save(state, checkpoint)  # same path, other weights
    with pytest.raises(BankValidationError, match="weights is .*sha256"):
        validate_bank(tmp_path / "bank", {"weights": str(checkpoint)})


def test_count_coreset_and_reservoir(product_dirs: tuple[Path, Path], tmp_path: Path, fast: dict) -> None:
    ok, _ = product_dirs
    summary = build_product(ok, tmp_path / "out", BuildOptions(**fast, coreset=50, reservoir_max=200))
    config = json.loads((tmp_path / "out" / "bank_config.json").read_text())
    assert summary["bank_size"] == 50 and summary["auroc"] is None
    assert config["coreset"]["candidates"] == 200 and config["coreset"]["patches_seen"] == 8 * 48
    assert config["coreset"]["reservoir_sampled"] is True


def test_deterministic_for_a_seed(product_dirs: tuple[Path, Path], tmp_path: Path, fast: dict) -> None:
    ok, _ = product_dirs
    for name in ("a", "b"):
        build_product(ok, tmp_path / name, BuildOptions(**fast, seed=3))
    a, b = (torch.load(tmp_path / n / "memory_bank.pt") for n in ("a", "b"))
    assert torch.equal(a, b)
    assert (tmp_path / "a" / "tau.json").read_text() == (tmp_path / "b" / "tau.json").read_text()


def test_unreadable_images_are_skipped_and_named(product_dirs: tuple[Path, Path], tmp_path: Path, fast: dict,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    ok = tmp_path / "ok"
    shutil.copytree(product_dirs[0], ok)
    (ok / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (ok / "notes.txt").write_text("not an image")
    truncated = (ok / "normal_000.jpg").read_bytes()
    (ok / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])

    with caplog.at_level(logging.INFO):
        summary = build_product(ok, tmp_path / "out", BuildOptions(**fast))

    assert summary["status"] == "completed" and summary["num_images"] == 8 and summary["num_skipped"] == 2
    assert "corrupt.jpg" in caplog.text and "truncated.jpg" in caplog.text and "notes.txt" in caplog.text


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "contains no normal images"),
    ("one", "1 readable normal image"),
    ("garbage", "none of the 3 normal image files"),
])
def test_bad_ok_dir_fails_clearly_and_writes_nothing(tmp_path: Path, setup: str, message: str, fast: dict,
                                                     make_product) -> None:  # noqa: ANN001
    ok = tmp_path / "ok"
    if setup != "missing":
        ok.mkdir()
    if setup == "one":
        make_product(tmp_path, 0, normals=1)
    if setup == "garbage":
        for i in range(3):
            (ok / f"bad{i}.png").write_bytes(b"garbage")
    out = tmp_path / "out"

    with pytest.raises(BankBuildError, match=message) as info:
        build_product(ok, out, BuildOptions(**fast))

    assert str(ok) in str(info.value)
    assert not out.exists()


def test_bad_options_fail_clearly() -> None:
    with pytest.raises(BankBuildError, match="unknown layer name.*'layer5'"):
        BuildOptions(layers="layer2,layer5")
    with pytest.raises(BankBuildError, match="coreset above 1 is a patch count"):
        BuildOptions(coreset=2.5)
    with pytest.raises(BankBuildError, match="stride must be >= 1"):
        BuildOptions(stride=0)
    assert BuildOptions(layers="layer3 layer2").layers == ["layer2", "layer3"]


def test_missing_defect_dir_fails(product_dirs: tuple[Path, Path], tmp_path: Path, fast: dict) -> None:
    with pytest.raises(BankBuildError, match="nope.*does not exist"):
        build_product(product_dirs[0], tmp_path / "out", BuildOptions(**fast), [tmp_path / "nope"])


def test_failure_while_writing_leaves_no_partial_bank(product_dirs: tuple[Path, Path], tmp_path: Path, fast: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"

    def broken_plot(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("inspection_refresh.patchcore.calibration.plot_histogram", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        build_product(product_dirs[0], out, BuildOptions(**fast))
    assert list(out.iterdir()) == []  # neither final names nor *.tmp files


def test_run_product_turns_failures_into_a_failed_summary(tmp_path: Path, fast: dict) -> None:
    (tmp_path / "ok").mkdir()
    summary = build_module.run_product(tmp_path / "ok", tmp_path / "out", BuildOptions(**fast), product="X1")
    assert summary["status"] == "failed" and summary["product"] == "X1"
    assert "contains no normal images" in summary["error"] and summary["bank_size"] is None


def test_write_bank_is_all_or_nothing(tmp_path: Path) -> None:
    bank = np.eye(4, 8, dtype=np.float32)
    bank_module.write_bank(tmp_path, bank, {"layers": ["layer2"]}, {"pixel": 1.0, "image": 2.0},
                           lambda p: p.write_bytes(b"png"))
    old = (tmp_path / "tau.json").read_text()

    def failing(path: Path) -> None:
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError):
        bank_module.write_bank(tmp_path, bank, {"layers": ["layer2"]}, {"pixel": 5.0, "image": 6.0}, failing)
    assert (tmp_path / "tau.json").read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(BANK_FILES)


def test_final_coreset_extend_and_fresh(product_dirs: tuple[Path, Path], tmp_path: Path, fast: dict) -> None:
    ok, _ = product_dirs
    banks = {}
    for mode in ("extend", "fresh"):
        summary = build_product(ok, tmp_path / mode, BuildOptions(**fast, final_coreset=mode))
        config = json.loads((tmp_path / mode / "bank_config.json").read_text())
        assert config["coreset"]["final"] == mode and summary["bank_size"] == int(np.ceil(BuildOptions().coreset * 8 * 48))
        banks[mode] = torch.load(tmp_path / mode / "memory_bank.pt")
    calib_size = config["calibration"]["calibration_bank_size"]
    # extend keeps the calibration bank's picks first; fresh searches again from its own first pick.
    assert banks["extend"].shape == banks["fresh"].shape
    assert len({tuple(r) for r in banks["extend"][:calib_size].tolist()}) == calib_size
    with pytest.raises(BankBuildError, match="final_coreset must be extend or fresh"):
        BuildOptions(final_coreset="other")
