"""A CLIP index run: its identity and params (:class:`ClipRun`), and what several of its steps ask."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from inspection_refresh import compose
from inspection_refresh.config import Settings, get_settings
from inspection_refresh.live import Releases
from inspection_refresh.publish import Publisher, PublishError
from inspection_refresh.runstore import RunStore, run_work_dir
from inspection_refresh.storage import ObjectInfo, ObjectStorage
from inspection_refresh.tasks import approval

DEPLOY_TYPE = "clip_rebuild"
PIPELINE = "clip"
STAGES = ["download", "embed", "index_save", approval.STAGE, "publish"]
INDEX_TYPES = ("normal", "defect")
VERSION_DIR = "version"
"""The run-store folder of the version ``index_save`` built (without its images), for ``publish``."""


@dataclass(frozen=True)
class ClipRun:
    """One run's identity and the operator's choices (the DAG params)."""

    index_type: str
    run_id: str
    prefix: str
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    batch_size: int = 32
    device: str = "auto"
    full_rebuild: bool = False
    skip_if_unchanged: bool = False
    max_missing_images: int = 0
    """Images that may fail to download (after every retry) and still leave a publishable index."""
    scheduled: bool = False
    deployed_by: str | None = None
    dag_id: str = ""
    """The Airflow DAG running this; with ``run_id`` it keys the deployment row. Default ``clip_index_<index_type>``."""
    settings: Settings = field(default_factory=get_settings)

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, not {self.index_type!r}")
        if not self.prefix.endswith("/"):
            object.__setattr__(self, "prefix", self.prefix + "/")
        if not self.dag_id:
            object.__setattr__(self, "dag_id", f"clip_index_{self.index_type}")

    @property
    def work_dir(self) -> Path:
        """The run's work directory on this host (what the ``local`` run store uses)."""
        return run_work_dir(self.settings.cache_root, PIPELINE, self.store_key)

    @property
    def store_key(self) -> str:
        """The run's folder in the run store: normal and defect runs may share a run id."""
        return f"{self.index_type}-{self.run_id}"

    @cached_property
    def store(self) -> RunStore:
        """What this run's tasks hand each other (``INSPECTION_RUN_STORE``)."""
        return compose.run_store(PIPELINE, self.store_key, self.settings, storage=self.mirror_storage())

    def mirror_storage(self) -> ObjectStorage:
        """Object storage for filling this worker's mirror and for the run store (``INSPECTION_MIRROR_TRANSFERS``)."""
        return compose.object_storage(self.settings.storage_conn_id, max_transfers=self.settings.mirror_transfers)

    @property
    def mirror_dir(self) -> Path:
        """Local mirror of the prefix; kept between runs so unchanged images are not downloaded again."""
        return self.settings.cache_root / PIPELINE / self.index_type / "images"

    @property
    def publisher(self) -> Publisher:
        return compose.index_publisher(self.settings)

    @property
    def releases(self) -> Releases:
        """What is live and kept: the release channel in ``channel``/``both`` mode, else the local root.
        A new one on each use: it memoises its reads, and another host may publish at any time."""
        return Releases(self.publisher)

    def live_version(self) -> str | None:
        """The live version of this run's index (the channel's ``current.json`` with a channel)."""
        return self.releases.current(self.index_type)


def source_fingerprint(prefix: str, objects: list[ObjectInfo]) -> str:
    """Identifies an exact set of image objects (key, ETag, size): those a build would read, or did."""
    digest = hashlib.sha256(prefix.encode())
    for obj in sorted(objects, key=lambda o: o.key):
        digest.update(f"\n{obj.key}\t{obj.etag}\t{obj.size}".encode())
    return digest.hexdigest()


def published_manifest(run: ClipRun) -> dict[str, Any] | None:
    """The live version's ``manifest.json`` (read from the channel with one: this host's root is only a
    working copy), or ``None`` if nothing is live or it has none. ``StorageError`` if the channel fails."""
    releases = run.releases
    version = releases.current(run.index_type)
    if version is None:
        return None
    try:
        raw = releases.read_file(run.index_type, version, "manifest.json")
        manifest = json.loads(raw) if raw is not None else None
    except (OSError, ValueError, PublishError):
        return None
    return manifest if isinstance(manifest, dict) else None


def unchanged_live_index(run: ClipRun, fingerprint: str) -> dict[str, Any] | None:
    """The live index's manifest if it was built from exactly these images with this model, else ``None``."""
    from inspection_refresh.clip.weights import model_identity

    manifest = published_manifest(run)
    if not manifest:
        return None  # nothing published, or a directory from before this package: publish a version
    same_images = manifest.get("source_fingerprint") == fingerprint
    same_model = manifest.get("model_identity") == model_identity(run.model, run.pretrained)
    return manifest if same_images and same_model else None


def local_images(run: ClipRun, inventory_doc: dict[str, Any]) -> dict[str, Path]:
    """Key -> the image on this worker, for every image of the run's inventory (:meth:`RunStore.fetch_images`:
    the download's own paths with the ``local`` run store; this worker's mirror, brought to the inventory,
    with ``storage``)."""
    return run.store.fetch_images(run.mirror_storage(), inventory_doc.get("prefix", run.prefix),
                                  inventory_doc["images"], run.mirror_dir)
