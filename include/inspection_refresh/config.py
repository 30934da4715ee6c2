"""Deployment settings, read from the environment in one place.

Every value has a production default that matches the service's layout
(CONTRACT.md); the demo and the tests override them through environment
variables. Per-run choices (model, batch size, products, ...) are DAG params,
not settings. Secrets never live here: credentials come from the Airflow
connections named below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from inspection_refresh.publish import Publisher, default_releases_dir

ENV_PREFIX = "INSPECTION_"


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_optional(name: str, default: str | None) -> str | None:
    """Empty string or ``none`` switches an optional setting off (e.g. no schedule)."""
    value = os.environ.get(ENV_PREFIX + name)
    if value is None:
        return default
    return None if value.strip().lower() in ("", "none", "off") else value.strip()


@dataclass(frozen=True)
class Settings:
    storage_conn_id: str
    """Airflow connection (type ``aws``) for NCP Object Storage."""
    bucket: str
    """Bucket holding ``images/normal/...`` and ``images/defect/...``."""
    db_conn_id: str
    """Airflow connection (type ``mysql``) for the service's database."""
    index_root: Path
    """Published CLIP indexes: ``<index_root>/normal/``, ``<index_root>/defect/``."""
    index_releases: Path
    """Kept versions of the CLIP indexes; outside ``index_root``, on its filesystem."""
    patchcore_root: Path
    """Published PatchCore banks: ``<patchcore_root>/<product_code>/``."""
    patchcore_releases: Path
    """Kept versions of the PatchCore banks; outside ``patchcore_root``, on its filesystem."""
    cache_root: Path
    """Downloaded images and embedding caches; safe to delete (costs a re-download)."""
    max_transfers: int
    """Concurrent object downloads across all DAGs (the service's plan caps it at 10): the size of
    ``transfer_pool``, and the threads (= pool slots) of a CLIP download task."""
    transfer_pool: str
    """Airflow pool every downloading task takes ``pool_slots`` = its download threads from."""
    patchcore_transfers: int
    """Download threads (= pool slots) of one PatchCore prepare task; at most ``max_transfers``."""
    keep_versions: int
    """Published versions kept per index type or product for rollback."""
    clip_schedule: str | None
    patchcore_schedule: str | None
    clip_model: str
    clip_pretrained: str
    patchcore_weights: str
    patchcore_pool: str
    patchcore_script: str
    """The default build script ("" = the bundled ``build_patchcore.sh``)."""
    patchcore_scripts: tuple[str, ...]
    """Other build scripts an operator may pick in the DAG's form (``INSPECTION_PATCHCORE_SCRIPTS``,
    colon-separated paths): the allow-list, since a script runs with the worker's rights."""

    @classmethod
    def from_env(cls) -> "Settings":
        data_root = Path(_env("DATA_ROOT", "/data/inspection"))
        index_root = Path(_env("INDEX_ROOT", str(data_root / "clip_index")))
        patchcore_root = Path(_env("PATCHCORE_ROOT", "/data/patchCore"))
        max_transfers = max(1, int(_env("MAX_TRANSFERS", "10")))
        return cls(
            storage_conn_id=_env("STORAGE_CONN_ID", "ncp_object_storage"),
            bucket=_env("BUCKET", os.environ.get("NCP_BUCKET", "dm-obs")),
            db_conn_id=_env("DB_CONN_ID", "deploy_db"),
            index_root=index_root,
            index_releases=Path(_env("INDEX_RELEASES", str(default_releases_dir(index_root)))),
            patchcore_root=patchcore_root,
            patchcore_releases=Path(_env("PATCHCORE_RELEASES", str(default_releases_dir(patchcore_root)))),
            cache_root=Path(_env("CACHE_ROOT", str(data_root / "cache"))),
            max_transfers=max_transfers,
            transfer_pool=_env("TRANSFER_POOL", "storage_transfers"),
            # More slots than the pool has would leave the task queued for ever.
            patchcore_transfers=min(max_transfers, max(1, int(_env("PATCHCORE_TRANSFERS", "2")))),
            keep_versions=int(_env("KEEP_VERSIONS", "5")),
            clip_schedule=_env_optional("CLIP_SCHEDULE", "0 2 * * *"),
            patchcore_schedule=_env_optional("PATCHCORE_SCHEDULE", None),
            clip_model=_env("CLIP_MODEL", "ViT-B-32"),
            clip_pretrained=_env("CLIP_PRETRAINED", "openai"),
            patchcore_weights=_env("PATCHCORE_WEIGHTS", "imagenet"),
            patchcore_pool=_env("PATCHCORE_POOL", "patchcore_build"),
            patchcore_script=_env("PATCHCORE_SCRIPT", ""),
            patchcore_scripts=tuple(p for p in _env("PATCHCORE_SCRIPTS", "").split(":") if p.strip()),
        )

    def index_publisher(self) -> Publisher:
        """Publishes the CLIP indexes (``normal``, ``defect``) under ``index_root``."""
        return Publisher(self.index_root, keep=self.keep_versions, releases=self.index_releases)

    def patchcore_publisher(self) -> Publisher:
        """Publishes the PatchCore banks (one name per product code) under ``patchcore_root``."""
        return Publisher(self.patchcore_root, keep=self.keep_versions, releases=self.patchcore_releases)


def get_settings() -> Settings:
    """Settings as the environment says now (read on each call, so tests can change it)."""
    return Settings.from_env()
