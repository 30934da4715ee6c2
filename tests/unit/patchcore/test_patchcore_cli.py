"""The CLI (``python -m inspection_refresh.patchcore.build``) and ``build_patchcore.sh``, run as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from inspection_refresh.patchcore.bank import BANK_FILES, validate_bank

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "include" / "inspection_refresh" / "build_patchcore.sh"
FAST_ARGS = ["--weights", "random", "--shorter", "96"]


def summaries(stdout: str) -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines() if line.startswith("PATCHCORE_SUMMARY ")]


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspection_refresh.patchcore.build", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_ok_dir_out_dir(product_dirs: tuple[Path, Path], tmp_path: Path, subprocess_env: dict) -> None:
    ok, defect = product_dirs
    out = tmp_path / "bank"
    result = run_cli(["--ok_dir", str(ok), "--out_dir", str(out), "--defect_dir", str(defect),
                      "--layers", "layer2", "layer3", "--stride", "2", "--product", "P0", *FAST_ARGS], subprocess_env)

    assert result.returncode == 0, result.stderr
    (summary,) = summaries(result.stdout)
    assert summary["status"] == "completed" and summary["product"] == "P0" and summary["num_images"] == 8
    assert summary["auroc"] is not None and summary["out_dir"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted((*BANK_FILES, "quality.json"))  # + the builder's side file
    facts = validate_bank(out, {"layers": ["layer2", "layer3"], "shorter": 96, "stride": 2})
    assert facts["bank_size"] == summary["bank_size"]
    assert "[P0] features (calibration bank)" in result.stderr  # progress lines go to stderr


def test_cli_root_builds_every_product(root_dir: Path, subprocess_env: dict) -> None:
    result = run_cli(["--root", str(root_dir), "--layers", "layer2,layer3", *FAST_ARGS], subprocess_env)

    assert result.returncode == 0, result.stderr
    found = summaries(result.stdout)
    assert [s["product"] for s in found] == ["PRD0", "PRD1"]
    for summary in found:
        assert summary["status"] == "completed"
        assert summary["out_dir"] == str(root_dir / summary["product"])
        validate_bank(root_dir / summary["product"], {"shorter": 96})


def test_cli_failures_exit_non_zero_with_a_clear_message(tmp_path: Path, subprocess_env: dict) -> None:
    (tmp_path / "ok").mkdir()
    result = run_cli(["--ok_dir", str(tmp_path / "ok"), "--out_dir", str(tmp_path / "out"), "--product", "EMPTY",
                      *FAST_ARGS], subprocess_env)
    assert result.returncode == 1
    (summary,) = summaries(result.stdout)
    assert summary["status"] == "failed" and "contains no normal images" in summary["error"]
    assert "[EMPTY] PatchCore build FAILED" in result.stderr and str(tmp_path / "ok") in result.stderr

    bad_layer = run_cli(["--ok_dir", str(tmp_path / "ok"), "--out_dir", str(tmp_path / "o"), "--layers", "layer9"],
                        subprocess_env)
    assert bad_layer.returncode == 1 and "unknown layer name(s) 'layer9'" in bad_layer.stderr

    usage = run_cli(["--ok_dir", str(tmp_path / "ok")], subprocess_env)
    assert usage.returncode == 2 and "--ok_dir needs --out_dir" in usage.stderr


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)


def test_build_patchcore_sh(product_dirs: tuple[Path, Path], tmp_path: Path, subprocess_env: dict) -> None:
    ok, defect = product_dirs
    out = tmp_path / "staging"
    env = {**subprocess_env, "PRODUCT_CODE": "P0", "OK_DIR": str(ok), "OUT_DIR": str(out),
           "DEFECT_DIRS": f"{defect}:{defect}", "PATCHCORE_WEIGHTS": "random", "PATCHCORE_SHORTER": "96",
           "PATCHCORE_STRIDE": "2", "PATCHCORE_LAYERS": "layer2,layer3", "PATCHCORE_CORESET": "0.2",
           "PATCHCORE_SEED": "1", "PATCHCORE_DEVICE": "cpu", "PYTHON": sys.executable}
    result = run_script(env)

    assert result.returncode == 0, result.stderr
    (summary,) = summaries(result.stdout)
    assert summary["product"] == "P0" and summary["num_defect_images"] == 6  # the dir was listed twice
    config = json.loads((out / "bank_config.json").read_text())
    assert config["coreset"]["seed"] == 1 and config["coreset"]["coreset"] == 0.2 and config["shorter"] == 96


def test_build_patchcore_sh_errors(tmp_path: Path, subprocess_env: dict) -> None:
    env = {k: v for k, v in subprocess_env.items() if k not in ("PRODUCT_CODE", "OK_DIR", "OUT_DIR")}
    missing = run_script({**env, "PRODUCT_CODE": "P9"})
    assert missing.returncode != 0 and "OK_DIR is required" in missing.stderr

    (tmp_path / "ok").mkdir()
    failed = run_script({**env, "PRODUCT_CODE": "P9", "OK_DIR": str(tmp_path / "ok"), "OUT_DIR": str(tmp_path / "o"),
                         "PATCHCORE_WEIGHTS": "random", "PYTHON": sys.executable})
    assert failed.returncode == 1
    assert "PatchCore build FAILED for product 'P9'" in failed.stderr and "contains no normal images" in failed.stderr


def test_old_quantile_percentiles_mean_the_same_as_percentiles(product_dirs: tuple[Path, Path], tmp_path: Path,
                                                                subprocess_env: dict) -> None:
    ok, _ = product_dirs
    taus = {}
    for spelling in ("0.995", "99.5"):
        result = run_cli(["--ok_dir", str(ok), "--out_dir", str(tmp_path / spelling), "--pixel_pct", spelling,
                          "--image_pct", spelling, *FAST_ARGS], subprocess_env)
        assert result.returncode == 0, result.stderr
        taus[spelling] = json.loads((tmp_path / spelling / "tau.json").read_text())
    assert taus["0.995"] == taus["99.5"]
    assert "pixel_pct 0.995 read as a quantile: the 99.5th percentile" in (
        run_cli(["--ok_dir", str(ok), "--out_dir", str(tmp_path / "again"), "--pixel_pct", "0.995", *FAST_ARGS],
                subprocess_env).stderr)
    lower = run_cli(["--ok_dir", str(ok), "--out_dir", str(tmp_path / "p50"), "--pixel_pct", "50", *FAST_ARGS],
                    subprocess_env)
    assert json.loads((tmp_path / "p50" / "tau.json").read_text())["pixel"] < taus["99.5"]["pixel"], lower.stderr


def test_help_states_the_defaults_next_to_the_old_script(subprocess_env: dict) -> None:
    result = run_cli(["--help"], subprocess_env)
    assert result.returncode == 0
    assert "--coreset        0.05" in result.stdout and "old: 0.02" in result.stdout
    assert "old: layer2,layer3,layer4" in result.stdout and "IMAGENET1K_V2" in result.stdout


def test_cli_root_refuses_a_published_root(root_dir: Path, tmp_path: Path, subprocess_env: dict) -> None:
    import shutil

    from inspection_refresh.publish import Publisher

    published = tmp_path / "patchCore"
    publisher = Publisher(published)
    staging = publisher.stage("PRD0")
    shutil.copytree(root_dir / "PRD0" / "ok", staging / "ok")
    publisher.publish("PRD0", staging)
    live_files = sorted(p.name for p in (published / "PRD0").iterdir())

    result = run_cli(["--root", str(published), *FAST_ARGS], subprocess_env)

    assert result.returncode == 1 and "is a published PatchCore root" in result.stderr
    assert sorted(p.name for p in (published / "PRD0").iterdir()) == live_files  # nothing written into the release
