"""A PatchCore run: its identity and params (:class:`PatchcoreRun`), the build script's contract, and
what several of its steps read back (stage records)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from inspection_refresh import compose
from inspection_refresh.config import Settings, get_settings
from inspection_refresh.patchcore.options import LAYER_CHANNELS, BuildOptions
from inspection_refresh.publish import Publisher, check_name
from inspection_refresh.runstore import RunFileMissing, RunStore, run_work_dir, safe_run_id
from inspection_refresh.runtime import PermanentError
from inspection_refresh.storage import ObjectStorage

DEPLOY_TYPE = "patchcore_create"
PIPELINE = "patchcore"
BUNDLED_SCRIPT = Path(__file__).resolve().parents[2] / "build_patchcore.sh"
SUMMARY_MARK = "PATCHCORE_SUMMARY "  # the builder's last stdout line, kept in the build log
LAYERS = tuple(LAYER_CHANNELS)
"""The ResNet-50 stages the service understands (one list, the builder's)."""
INVENTORY = "inventory.json"
"""Per product in the run store: the ``ok`` and ``defects`` images ``prepare`` mirrored (key, ETag, size)."""
BUILD_LOG = "build.log"
BANK_DIR = "bank"
"""Per product: the bank the build wrote (its ``OUT_DIR``), as the run store keeps it (stored under this
name with ``storage``; left in its staging directory with ``local``)."""
PRODUCT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$"
"""What the ``products`` param accepts, each entry: a product code (``products.product_code``, VARCHAR(50), one
that can name a directory) or a product id."""
BUILD_DEFAULTS = BuildOptions()
"""The builder's defaults, which the DAG's params and a run start from."""


@dataclass(frozen=True)
class PatchcoreRun:
    """One run's identity and the operator's choices (the DAG params)."""

    run_id: str
    products: tuple[str, ...] = ()
    coreset: float = BUILD_DEFAULTS.coreset
    shorter: int = BUILD_DEFAULTS.shorter
    stride: int = BUILD_DEFAULTS.stride
    layers: tuple[str, ...] = tuple(BUILD_DEFAULTS.layers)
    script: str = ""
    weights: str = "imagenet"
    device: str = "auto"
    scheduled: bool = False
    deployed_by: str | None = None
    dag_id: str = "patchcore_memory_bank"
    """The Airflow DAG running this; with ``run_id`` it keys the deployment row."""
    settings: Settings = field(default_factory=get_settings)

    def __post_init__(self) -> None:
        unknown = [layer for layer in self.layers if layer not in LAYERS]
        if unknown or not self.layers:
            raise PermanentError(f"layers must be a non-empty subset of {LAYERS}, got {list(self.layers)}")
        if not (0 < self.coreset) or self.shorter < 32 or self.stride < 1:
            raise PermanentError("coreset must be > 0, shorter >= 32 and stride >= 1")

    @property
    def work_dir(self) -> Path:
        """The run's work directory on this host (what the ``local`` run store uses)."""
        return run_work_dir(self.settings.cache_root, PIPELINE, self.run_id)

    @cached_property
    def store(self) -> RunStore:
        """What this run's tasks hand each other (``INSPECTION_RUN_STORE``); the approval record is here."""
        return compose.run_store(PIPELINE, self.run_id, self.settings, storage=self.mirror_storage())

    def product_store(self, code: str) -> RunStore:
        """The product's part of the run store: its stage records, inventory, build log and built bank."""
        return self.store.within(check_name(code))

    def mirror_storage(self) -> ObjectStorage:
        """Object storage for filling this worker's mirror and for the run store (``INSPECTION_MIRROR_TRANSFERS``)."""
        return compose.object_storage(self.settings.storage_conn_id, max_transfers=self.settings.mirror_transfers)

    def mirror_dir(self, code: str) -> Path:
        """This worker's mirror of a product's images: ``ok/`` (normal) and ``defects/``; kept between runs."""
        return self.settings.cache_root / PIPELINE / check_name(code)

    def build_dir(self, code: str) -> Path:
        """This worker's scratch for a build (its :meth:`RunStore.workspace` with ``storage``): ``bank/``, the log."""
        return self.settings.cache_root / PIPELINE / "builds" / safe_run_id(self.run_id) / check_name(code)

    @property
    def publisher(self) -> Publisher:
        return compose.patchcore_publisher(self.settings)

    @property
    def script_path(self) -> Path:
        """The chosen build script; only scripts of the settings' allow-list run."""
        allowed = allowed_scripts(self.settings)
        script = self.script or allowed[0]
        if script not in allowed:
            raise PermanentError(f"build script {script} is not allowed on this worker (allowed: {', '.join(allowed)}); "
                                 "add it to INSPECTION_PATCHCORE_SCRIPTS (colon-separated) on the workers")
        if not Path(script).is_file():
            raise PermanentError(f"build script {script} does not exist on this worker; install it there or "
                                 "remove it from INSPECTION_PATCHCORE_SCRIPTS")
        return Path(script)

    def expected_config(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "shorter": self.shorter, "stride": self.stride, "weights": self.weights}


def allowed_scripts(settings: Settings) -> list[str]:
    """Build scripts an operator may choose: the default (first), then ``INSPECTION_PATCHCORE_SCRIPTS``."""
    default = settings.patchcore_script or str(BUNDLED_SCRIPT)
    return list(dict.fromkeys([default, *settings.patchcore_scripts]))


# What a build script inherits from the worker: enough to run Python, torch and CUDA, and never the
# worker's Airflow connections (AIRFLOW_CONN_*) or other secrets.
SCRIPT_ENV_PASSTHROUGH = (
    "PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TORCH_HOME", "XDG_CACHE_HOME",
)


def script_environment(contract: dict[str, str]) -> dict[str, str]:
    """The build script's whole environment: the contract's variables plus :data:`SCRIPT_ENV_PASSTHROUGH`."""
    inherited = {name: os.environ[name] for name in SCRIPT_ENV_PASSTHROUGH if name in os.environ}
    return {**inherited, **contract}


def db_configured(conn_id: str) -> bool:
    try:
        from airflow.sdk import BaseHook

        BaseHook.get_connection(conn_id)
        return True
    except Exception:
        return False


def read_or_none(store: RunStore, name: str) -> Any:
    try:
        return store.read_json(name)
    except RunFileMissing:
        return None


def stage_record(run: PatchcoreRun, code: str, stage: str) -> dict[str, Any] | None:
    """A product's stage record, or ``None`` if that stage left none."""
    return read_or_none(run.product_store(code), f"stage-{stage}.json")
