"""The package's layers (pyproject.toml, ``[tool.importlinter]``) hold, and a backwards import breaks them
with a message that names it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    done = lint_imports(ROOT, ROOT / "include")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of the package and its contracts, to break on purpose."""
    shutil.copytree(ROOT / "include" / "inspection_refresh", tmp_path / "include" / "inspection_refresh",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(("module", "line", "named"), [
    # storage reaching up to the tasks: the layers contract names the import
    ("storage/keys.py", "from inspection_refresh.tasks import common",
     "inspection_refresh.storage.keys -> inspection_refresh.tasks.common"),
    # Airflow below the Airflow-facing layer
    ("publish.py", "import airflow.sdk", "inspection_refresh.publish -> airflow"),
    # numpy in what the serving hosts' agent imports, even indirectly
    ("channel.py", "import numpy", "inspection_refresh.channel -> numpy"),
])
def test_a_backwards_import_breaks_a_contract_and_is_named(package_copy: Path, module: str, line: str, named: str):
    path = package_copy / "include" / "inspection_refresh" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    done = lint_imports(package_copy, package_copy / "include")
    assert done.returncode != 0, done.stdout
    assert named in done.stdout, done.stdout
    assert "BROKEN" in done.stdout
