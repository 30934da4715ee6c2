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

from inspection_refresh.publish import default_releases_dir

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
    """Concurrent object downloads (the service's plan caps it at 10)."""
    keep_versions: int
    """Published versions kept per index type or product for rollback."""
    clip_schedule: str | None
    patchcore_schedule: str | None
    clip_model: str
    clip_pretrained: str
    patchcore_weights: str
    patchcore_pool: str
    patchcore_script: str

    @classmethod
    def from_env(cls) -> "Settings":
        data_root = Path(_env("DATA_ROOT", "/data/inspection"))
        index_root = Path(_env("INDEX_ROOT", str(data_root / "clip_index")))
        patchcore_root = Path(_env("PATCHCORE_ROOT", "/data/patchCore"))
        return cls(
            storage_conn_id=_env("STORAGE_CONN_ID", "ncp_object_storage"),
            bucket=_env("BUCKET", os.environ.get("NCP_BUCKET", "dm-obs")),
            db_conn_id=_env("DB_CONN_ID", "deploy_db"),
            index_root=index_root,
            index_releases=Path(_env("INDEX_RELEASES", str(default_releases_dir(index_root)))),
            patchcore_root=patchcore_root,
            patchcore_releases=Path(_env("PATCHCORE_RELEASES", str(default_releases_dir(patchcore_root)))),
            cache_root=Path(_env("CACHE_ROOT", str(data_root / "cache"))),
            max_transfers=int(_env("MAX_TRANSFERS", "10")),
            keep_versions=int(_env("KEEP_VERSIONS", "5")),
            clip_schedule=_env_optional("CLIP_SCHEDULE", "0 2 * * *"),
            patchcore_schedule=_env_optional("PATCHCORE_SCHEDULE", None),
            clip_model=_env("CLIP_MODEL", "ViT-B-32"),
            clip_pretrained=_env("CLIP_PRETRAINED", "openai"),
            patchcore_weights=_env("PATCHCORE_WEIGHTS", "imagenet"),
            patchcore_pool=_env("PATCHCORE_POOL", "patchcore_build"),
            patchcore_script=_env("PATCHCORE_SCRIPT", ""),
        )


def get_settings() -> Settings:
    """Settings as the environment says now (read on each call, so tests can change it)."""
    return Settings.from_env()
