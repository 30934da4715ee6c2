"""Small synthetic image sets shared by the PatchCore tests (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# As the CLI does (inspection_refresh.patchcore.build.main): OpenMP threads sleep rather than spin
# when idle, so in-process builds on a busy shared machine do not slow down several-fold. Only
# takes effect if torch was not imported yet; a value set by the caller wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from inspection_refresh.dev.samples import DEFECT_TYPES, render_defect, render_normal

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "include" / "inspection_refresh" / "build_patchcore.sh"
FAST = {"weights": "random", "shorter": 96}
"""Options that keep a build to about a second: random weights, tiny images."""


def write_product(directory: Path, product: int, normals: int, defects: int = 0,
                  size: tuple[int, int] = (160, 128)) -> tuple[Path, Path]:
    """``directory/ok`` with ``normals`` JPEGs and ``directory/defect`` with ``defects``; returns both."""
    ok, defect = directory / "ok", directory / "defect"
    ok.mkdir(parents=True, exist_ok=True)
    defect.mkdir(parents=True, exist_ok=True)
    for seed in range(normals):
        render_normal(product, seed, size).save(ok / f"normal_{seed:03d}.jpg", quality=92)
    for seed in range(defects):
        render_defect(product, 1000 + seed, DEFECT_TYPES[seed % 3], size).save(
            defect / f"defect_{seed:03d}.jpg", quality=92)
    return ok, defect


@pytest.fixture(scope="session")
def fast() -> dict[str, object]:
    """``BuildOptions`` keywords for quick builds (random weights, tiny images)."""
    return dict(FAST)


@pytest.fixture(scope="session")
def make_product():  # noqa: ANN201 -- returns write_product
    """``write_product(directory, product, normals, defects=0, size=(160, 128))`` for tests that need their own set."""
    return write_product


@pytest.fixture(scope="session")
def product_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One product: 8 normal and 3 defect images of 160x128 (read-only for tests)."""
    return write_product(tmp_path_factory.mktemp("product") / "P0", 0, normals=8, defects=3)


@pytest.fixture(scope="session")
def root_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``--root`` layout with two products of 6 normal images each."""
    root = tmp_path_factory.mktemp("root")
    for index in range(2):
        write_product(root / f"PRD{index}", index, normals=6)
        (root / f"PRD{index}" / "defect").rmdir()
    (root / "not_a_product").mkdir()
    return root


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: this interpreter, one thread (tests share a small machine)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
