"""The CLIP index pipeline as plain functions: download -> embed -> index_save -> (approve) -> publish -> register.

Each function is one Airflow task of ``clip_index_normal`` / ``clip_index_defect``
and can be called without a scheduler. They hand each other small dicts (XCom);
bulk data (the image inventory, vectors, stage records, the built version) goes
through the run's :class:`~inspection_refresh.runstore.RunStore`: the run's work
directory (``INSPECTION_RUN_STORE=local``, one host) or object storage (``storage``:
each task may run on another worker). Images stay in each worker's own mirror: a
task that needs them brings its mirror to the run's inventory
(:func:`~inspection_refresh.runstore.materialise_images`).
``index_save`` writes and verifies the new version in a staging directory, the
``approve`` task (``airflow_support.PublishApproval``, shown :func:`approval_request`)
lets a person approve or reject it when the run requires that, and ``publish``
makes the staged version live (with the ``storage`` store it first rebuilds the
staging directory on its own worker from the stored version and its own mirror).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from inspection_refresh.airflow_support import finished_run_state, refuse_publishing_if_run_ended
from inspection_refresh.config import Settings, get_settings
from inspection_refresh.files import link_or_copy
from inspection_refresh.images import parse_image_key, reject_reason
from inspection_refresh.progress import counted
from inspection_refresh.publish import Publisher, PublishError, describe_pin, new_version_id
from inspection_refresh.registry import DeploymentRegistry, RegistryError
from inspection_refresh.runstore import RunStore, materialise_images
from inspection_refresh.storage import ObjectInfo, ObjectStorage, StorageError, plan_mirror, require_complete
from inspection_refresh.tasks.common import NothingToDo, cap_list, read_json, recorded_outcome, run_work_dir, unpin_hint
from inspection_refresh.tasks import approval
from inspection_refresh.tasks.stages import first_failure, read_stages, record_stage

log = logging.getLogger(__name__)

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
        return RunStore.for_run(PIPELINE, self.store_key, self.settings, storage=self.mirror_storage())

    def mirror_storage(self) -> ObjectStorage:
        """Object storage for filling this worker's mirror and for the run store (``INSPECTION_MIRROR_TRANSFERS``)."""
        return ObjectStorage(self.settings.storage_conn_id, max_transfers=self.settings.mirror_transfers)

    @property
    def mirror_dir(self) -> Path:
        """Local mirror of the prefix; kept between runs so unchanged images are not downloaded again."""
        return self.settings.cache_root / PIPELINE / self.index_type / "images"

    @property
    def publisher(self) -> Publisher:
        return self.settings.index_publisher()


def source_fingerprint(prefix: str, objects: list[ObjectInfo]) -> str:
    """Identifies an exact set of image objects (key, ETag, size): those a build would read, or did."""
    digest = hashlib.sha256(prefix.encode())
    for obj in sorted(objects, key=lambda o: o.key):
        digest.update(f"\n{obj.key}\t{obj.etag}\t{obj.size}".encode())
    return digest.hexdigest()


def published_manifest(run: ClipRun) -> dict[str, Any] | None:
    path = run.publisher.live_path(run.index_type) / "manifest.json"
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def download(run: ClipRun) -> dict[str, Any]:
    """List the prefix, decide whether a rebuild is needed, open the deployment row, mirror the images.

    Images that still fail after the sync's retries fail the task (transiently, so
    Airflow retries it), unless there are at most ``run.max_missing_images``: then
    the index is built without them and they are listed as missing.
    """
    store = run.store
    store.sweep()  # what failed runs left, after INSPECTION_RUN_RETENTION_DAYS
    store.remove_run()  # a cleared-and-rerun run starts clean
    with record_stage(store, "download") as stage:
        if run.scheduled:
            _skip_if_pinned(run)
        storage = ObjectStorage(run.settings.storage_conn_id, max_transfers=run.settings.max_transfers)
        storage.check_access()
        listing = list(storage.list_objects(run.prefix))
        candidates = [obj for obj, _ in plan_mirror(listing, run.prefix, run.mirror_dir, reject_reason)[0].values()]
        if (run.scheduled or run.skip_if_unchanged) and not run.full_rebuild:
            _skip_if_unchanged(run, source_fingerprint(run.prefix, candidates))

        registry = DeploymentRegistry(run.settings.db_conn_id)
        registry.close_abandoned_runs(run.dag_id, run.run_id, finished_run_state)
        registry.start(DEPLOY_TYPE, run.dag_id, run.run_id, deployed_by=run.deployed_by,
                       details={"index_type": run.index_type, "source_prefix": run.prefix})
        if not candidates:
            raise StorageError(
                f"no images under s3://{storage.bucket}/{run.prefix} ({len(listing)} other objects): "
                "upload images there or choose another prefix; the published index is unchanged"
            )
        result = storage.sync_prefix(run.prefix, run.mirror_dir, accept=reject_reason, objects=listing)
        missing = [key for key, _ in result.failed]
        # What is indexed, not what is listed: an index missing images does not match the
        # listing, so the next scheduled run rebuilds it instead of skipping.
        fingerprint = source_fingerprint(run.prefix, [obj for obj in candidates if obj.key in result.files])
        stage.facts = {  # recorded before the checks below, so a failed run's row names the missing images
            **result.summary(),  # with num_skipped / num_failed: exact counts of the lists shortened below
            "bucket": storage.bucket,
            "source_fingerprint": fingerprint,
            "skipped": cap_list([list(s) for s in result.skipped]),
            "failed": cap_list([list(f) for f in result.failed]),
            "missing_images": cap_list(missing),
            "num_missing": len(missing),
        }
        if not result.files:
            raise StorageError(f"none of the {len(candidates)} images under {run.prefix} could be downloaded: "
                               f"{cap_list(result.failed, 3)}", transient=True)
        require_complete(result, allowed_missing=run.max_missing_images,
                         hint="Set the DAG param max_missing_images to publish an index without them.")
        # key, etag and size let another worker's task fetch exactly these versions; path is this worker's copy.
        sizes = {obj.key: obj.size for obj in candidates}
        inventory = [{"key": key, "etag": result.etags[key], "size": sizes[key], "path": str(path)}
                     for key, path in sorted(result.files.items())]
        store.write_json("inventory.json", {"prefix": run.prefix, "storage_urls": {
            key: storage.storage_url(key) for key in result.files}, "images": inventory})
        log.info("Downloaded %s under %s (%d new, %d unchanged, %s skipped, %d missing)",
                 counted(len(result.files), "image"), run.prefix, result.downloaded, result.unchanged,
                 counted(len(result.skipped), "object"), len(missing))
        return {"images": len(inventory), "source_fingerprint": fingerprint,
                "downloaded": result.downloaded, "unchanged": result.unchanged,
                "skipped": len(result.skipped), "missing": len(missing)}


def unchanged_live_index(run: ClipRun, fingerprint: str) -> dict[str, Any] | None:
    """The live index's manifest if it was built from exactly these images with this model, else ``None``."""
    from inspection_refresh.clip.weights import model_identity

    manifest = published_manifest(run)
    if not manifest or run.publisher.current(run.index_type) is None:
        return None  # nothing published, or a directory from before this package: publish a version
    same_images = manifest.get("source_fingerprint") == fingerprint
    same_model = manifest.get("model_identity") == model_identity(run.model, run.pretrained)
    return manifest if same_images and same_model else None


def _skip_if_unchanged(run: ClipRun, fingerprint: str) -> None:
    manifest = unchanged_live_index(run, fingerprint)
    if manifest:
        raise NothingToDo(
            f"images under {run.prefix} are unchanged since the published {run.index_type} index "
            f"(version {run.publisher.current(run.index_type)}, {manifest.get('count')} images, same model): "
            "skipping the rebuild. Trigger with full_rebuild=true to force one."
        )


def _skip_if_pinned(run: ClipRun) -> None:
    """A rolled-back index is pinned: scheduled runs must not replace it."""
    pin = run.publisher.pinned(run.index_type)
    if pin:
        raise NothingToDo(f"the {run.index_type} index is {describe_pin(pin)}, so scheduled runs leave it alone. "
                          + unpin_hint(f"clip:{run.index_type}"))


def embed(run: ClipRun) -> dict[str, Any]:
    """Embed the mirrored images as the service embeds queries; reuse cached embeddings."""
    from inspection_refresh.clip.cache import default_cache_dir
    from inspection_refresh.clip.embed import EmbeddingCache, embed_files, load_model
    from inspection_refresh.clip.weights import is_random_checkpoint

    store = run.store
    with record_stage(store, "embed") as stage:
        inventory_doc = store.read_json("inventory.json")
        inventory = inventory_doc["images"]
        images = local_images(run, inventory_doc)
        if is_random_checkpoint(run.pretrained):
            log.warning("Embedding with RANDOM-INIT weights from %s: similarity scores are meaningless "
                        "(offline demo/test checkpoint, not for the service)", run.pretrained)
        model = load_model(run.model, run.pretrained, run.device, lazy=True)  # loads only if a miss needs it
        cache = None if run.full_rebuild else EmbeddingCache(default_cache_dir(run.settings.cache_root))
        result = embed_files([images[item["key"]] for item in inventory], model, batch_size=run.batch_size,
                             cache=cache, progress_label=f"Embedding {run.index_type} images")
        failures = [(inventory[index]["key"], reason) for index, reason in result.failures]
        if len(result.ok_indices) == 0:
            raise ValueError(f"none of the {len(inventory)} images under {run.prefix} could be read "
                             f"(first: {cap_list(failures, 3)}); the published index is unchanged")
        _save_vectors(store, result.vectors)
        store.write_json("rows.json", [int(i) for i in result.ok_indices])
        stage.facts = {
            "images": len(result.ok_indices), "embedded": result.embedded, "cached": result.cached,
            "unreadable": cap_list([list(f) for f in failures]), "num_unreadable": len(failures),
            "embedding_dim": int(result.vectors.shape[1]),
            "images_per_second": round(result.images_per_second, 2), "seconds": round(result.seconds, 2),
            "model_identity": model.identity, "random_weights": is_random_checkpoint(run.pretrained),
        }
        log.info("Embedded %s (%d computed, %d from cache, %d unreadable) in %.1fs",
                 counted(len(result.ok_indices), "image"), result.embedded, result.cached, len(failures),
                 result.seconds)
        return {key: stage.facts[key] for key in ("images", "embedded", "cached", "embedding_dim")} | {
            "unreadable": len(failures)}


def local_images(run: ClipRun, inventory_doc: dict[str, Any]) -> dict[str, Path]:
    """Key -> the image on this worker, for every image of the run's inventory.

    With the ``local`` run store every task shares the download's mirror: its paths, as recorded.
    With ``storage`` this worker's mirror is brought to the inventory first (only what it lacks or
    holds in another version is downloaded); an image that cannot be fetched fails the task for a retry.
    """
    if run.store.backend == "local":
        return {item["key"]: Path(item["path"]) for item in inventory_doc["images"]}
    result = materialise_images(run.mirror_storage(), inventory_doc.get("prefix", run.prefix),
                                inventory_doc["images"], run.mirror_dir)
    require_complete(result)
    log.info("This worker's mirror %s holds the run's %s (%d downloaded, %d already here)", run.mirror_dir,
             counted(len(result.files), "image"), result.downloaded, result.unchanged)
    return result.files


def _save_vectors(store: RunStore, vectors: Any) -> None:
    import numpy as np

    if store.local_dir is not None:  # straight into the work directory, as before
        np.save(store.local_dir / "vectors.npy", vectors)
        return
    with tempfile.TemporaryDirectory(prefix="clip-vectors-") as scratch:
        path = Path(scratch) / "vectors.npy"
        np.save(path, vectors)
        store.put_file("vectors.npy", path)


def _load_vectors(store: RunStore) -> Any:
    import numpy as np

    if store.local_dir is not None:
        return np.load(store.local_dir / "vectors.npy")
    with tempfile.TemporaryDirectory(prefix="clip-vectors-") as scratch:
        return np.load(store.get_file("vectors.npy", Path(scratch) / "vectors.npy"))


def _product_lookup(run: ClipRun) -> dict[int, Any]:
    try:
        return DeploymentRegistry(run.settings.db_conn_id).products_by_id()
    except RegistryError as exc:
        log.warning("No product names in the metadata (products table unavailable: %s)", exc)
        return {}


def index_save(run: ClipRun) -> dict[str, Any]:
    """Write every service format into a staging version and verify it; ``publish`` makes it live.

    Records the staged version (``staging``, ``version``, ``count``, ``dim`` and the self-retrieval
    check) for the approval step and ``publish``. With the ``storage`` run store the version's files
    (not its images) go to the run store instead and nothing stays staged on this worker. When the
    images and the model are those of the live index nothing is staged (``unchanged``).
    """
    from inspection_refresh.clip.index import verify_index, write_index_files
    from inspection_refresh.clip.weights import model_identity

    store = run.store
    with record_stage(store, "index_save") as stage:
        downloaded = store.read_json("stage-download.json")["facts"]
        live = None if run.full_rebuild else unchanged_live_index(run, downloaded["source_fingerprint"])
        if live:  # an identical version would only push distinct older versions out of the kept ones
            stage.facts = {"unchanged": True, "version": run.publisher.current(run.index_type),
                           "path": str(run.publisher.live_path(run.index_type)), "count": live.get("count"),
                           "dim": live.get("dim")}
            log.info("Same images and model as the live %s index: version %s stays live, nothing to publish",
                     run.index_type, stage.facts["version"])
            return dict(stage.facts)
        inventory_doc = store.read_json("inventory.json")
        inventory = inventory_doc["images"]
        rows = store.read_json("rows.json")
        vectors = _load_vectors(store)
        images = local_images(run, inventory_doc)
        products = _product_lookup(run)

        publisher = run.publisher
        version = new_version_id()
        staging = publisher.stage(run.index_type)  # also removes what an interrupted try left
        final_dir = staging.parent / version  # where the staging dir will live once published
        try:
            gallery_paths, metadata = [], []
            for row, index in enumerate(rows):
                item = inventory[index]
                relative = images[item["key"]].relative_to(run.mirror_dir)
                link_or_copy(images[item["key"]], staging / "images" / relative)
                gallery_paths.append(str(final_dir / "images" / relative))
                metadata.append(_metadata_record(row, item["key"], gallery_paths[-1],
                                                 inventory_doc["storage_urls"][item["key"]], products))
            manifest = write_index_files(
                staging, vectors, gallery_paths, metadata,
                index_type=run.index_type, model_id=run.model, pretrained=run.pretrained,
                manifest_extra={
                    "version": version,
                    "model_identity": model_identity(run.model, run.pretrained),
                    "source_bucket": downloaded["bucket"],
                    "source_prefix": run.prefix,
                    "source_fingerprint": downloaded["source_fingerprint"],
                    "missing_images": downloaded.get("missing_images", []),
                    "run_id": run.run_id,
                    "created_at": datetime.now(timezone.utc).isoformat(),
                },
            )
            verified = verify_index(staging)
            # A run an operator ended while this wrote has nothing to stage for.
            refuse_publishing_if_run_ended(run.dag_id, run.run_id, f"{run.index_type} index version {version}")
            if store.backend == "storage":
                # publish may run on another worker: it rebuilds this directory from the stored version
                # files and its own mirror's images (same gallery paths), so nothing stays staged here.
                store.put_dir(VERSION_DIR, staging, skip=["images"])
                publisher.discard(staging)
        except BaseException:
            publisher.discard(staging)
            raise
        stage.facts = {"version": version, "count": manifest["count"], "dim": manifest["dim"],
                       "verified": bool(verified), "self_top1": verified.get("self_top1"),
                       "ties": verified.get("ties"), "gallery_root": str(final_dir / "images")}
        if store.backend == "local":
            stage.facts["staging"] = str(staging)
        log.info("Staged %s index version %s: %d images, dim %d, every image finds itself first (%d exact-"
                 "duplicate ties); publish makes it live", run.index_type, version, manifest["count"],
                 manifest["dim"], verified.get("ties", 0))
        return {k: v for k, v in stage.facts.items() if k not in ("staging", "gallery_root")}


def _live_image_urls(run: ClipRun) -> set[str] | None:
    """The storage URLs of the images in the live index (its ``metadata.json``), or None."""
    try:
        records = read_json(run.publisher.live_path(run.index_type) / "metadata.json")["metadata"]
        return {r["storage_url"] for r in records if isinstance(r, dict) and r.get("storage_url")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def approval_request(run: ClipRun) -> approval.ApprovalRequest | None:
    """What the approver sees before ``publish``: image count before/after (and which images come
    and go), the self-retrieval check of the staged index, what was skipped; ``None`` when the
    run would publish nothing (unchanged index)."""
    store = run.store
    saved = store.read_json("stage-index_save.json")["facts"]
    if saved.get("unchanged"):
        return None
    downloaded = store.read_json("stage-download.json")["facts"]
    embedded = store.read_json("stage-embed.json")["facts"]
    live_version = run.publisher.current(run.index_type)
    live = published_manifest(run) if live_version else None
    before = live.get("count") if live else None
    after = saved["count"]
    new_urls = set(store.read_json("inventory.json")["storage_urls"].values())
    old_urls = _live_image_urls(run) if live else set()
    added = sorted(new_urls - old_urls) if old_urls is not None else []
    removed = sorted(old_urls - new_urls) if old_urls is not None else []
    ties = saved.get("ties") or 0
    summary = {
        "index_type": run.index_type, "live_version": live_version, "new_version": saved["version"],
        "images_before": before, "images_after": after,
        "images_added": len(added), "images_removed": len(removed),
        "self_retrieval": {"checked": after, "found_themselves_first": saved.get("self_top1", after),
                           "exact_duplicate_ties": ties, "passed": bool(saved.get("verified"))},
        "dim_before": live.get("dim") if live else None, "dim_after": saved.get("dim"),
        "model": f"{run.model} / {run.pretrained}",
        "skipped_objects": downloaded.get("num_skipped", 0), "unreadable_images": embedded.get("num_unreadable", 0),
        "missing_images": downloaded.get("num_missing", 0), "random_weights": embedded.get("random_weights", False),
    }
    delta = f" ({after - before:+d})" if before is not None else ""
    lines = [
        f"**{run.dag_id}** would publish **{run.index_type}** index version `{saved['version']}`"
        + (f", replacing the live version `{live_version}`." if live_version else " (no index is live yet)."),
        "",
        approval.markdown_table(["", f"Live ({live_version or 'none'})", f"New ({saved['version']})"], [
            ["Images", before, f"{after}{delta}"],
            ["Embedding dim", summary["dim_before"], summary["dim_after"]],
            ["Model", (live or {}).get("model") and f"{live.get('model')} / {live.get('pretrained')}", summary["model"]],
        ]),
        "",
        f"Images added: {len(added)}, removed: {len(removed)}"
        + (f" (added: {', '.join(u.rsplit('/', 1)[-1] for u in added[:10])}{' …' if len(added) > 10 else ''})"
           if added else "")
        + (f" (removed: {', '.join(u.rsplit('/', 1)[-1] for u in removed[:10])}{' …' if len(removed) > 10 else ''})"
           if removed else ""),
        "",
        f"**Self-retrieval check: {'passed' if saved.get('verified') else 'NOT passed'}** — every one of the {after} "
        f"images finds itself first ({ties} exact-duplicate ties).",
        f"Skipped objects: {summary['skipped_objects']}, unreadable images: {summary['unreadable_images']}, "
        f"missing (not downloaded): {summary['missing_images']}.",
    ]
    if summary["random_weights"]:
        lines += ["", "⚠ Embedded with RANDOM weights (demo/test checkpoint): similarity scores are meaningless."]
    lines += ["", f"**Approve** publishes it. **Reject** keeps "
                  f"{'version ' + live_version if live_version else 'nothing'} live and discards the new version."]
    subject = (f"Publish {run.index_type} index version {saved['version']}: {after} images"
               + (f" (live: {before})" if before is not None else ""))
    return approval.ApprovalRequest(subject=subject, body="\n".join(lines), summary=summary)


def publish(run: ClipRun) -> dict[str, Any]:
    """Make the version ``index_save`` staged live, atomically, if the approval step allowed it.

    An unchanged index publishes nothing ("version X stays live"). Raises :class:`NothingToDo`
    when the approval step rejected the version (or did not answer); its staging directory is
    left for ``register`` to discard, so a retried publish can still use it.
    """
    store = run.store
    with record_stage(store, "publish") as stage:
        saved = store.read_json("stage-index_save.json")["facts"]
        if saved.get("unchanged"):
            stage.facts = dict(saved)
            log.info("Nothing to publish: version %s of the %s index stays live", saved["version"], run.index_type)
            return dict(stage.facts)
        version = saved["version"]
        what = f"{run.index_type} index version {version}"
        approval.require_approved(store, what)
        if store.backend == "local":
            staging = Path(saved["staging"])
            if not staging.is_dir():
                raise PublishError(f"the staged {what} at {staging} is gone; rerun the DAG")
        else:
            staging = _stage_from_store(run, saved)
        try:
            refuse_publishing_if_run_ended(run.dag_id, run.run_id, what)
            # A manual run replaces a rollback's pin; a scheduled one never publishes over it.
            release = run.publisher.publish(run.index_type, staging, version, unpin=not run.scheduled)
        except BaseException:
            if store.backend == "storage":  # rebuilt from the store by each try; never left behind
                run.publisher.discard(staging)
            raise
        stage.facts = {"version": release.version, "path": str(run.publisher.live_path(run.index_type)),
                       "count": saved["count"], "dim": saved["dim"], "verified": saved.get("verified")}
        log.info("Published %s index version %s: %d images, dim %d, at %s", run.index_type, release.version,
                 saved["count"], saved["dim"], stage.facts["path"])
        return dict(stage.facts)


def _stage_from_store(run: ClipRun, saved: dict[str, Any]) -> Path:
    """The version ``index_save`` stored, as a staging directory on this worker: its files from the
    run store, its images hard-linked from this worker's mirror at the gallery paths it names."""
    store, publisher = run.store, run.publisher
    staging = publisher.stage(run.index_type)  # also removes what an interrupted try left
    try:
        gallery_root = staging.parent / saved["version"] / "images"
        if saved.get("gallery_root") and Path(saved["gallery_root"]) != gallery_root:
            raise PublishError(
                f"the {run.index_type} index version {saved['version']} names its images under "
                f"{saved['gallery_root']}, but this worker would publish it under {gallery_root}: set the same "
                "INSPECTION_INDEX_ROOT (and INSPECTION_INDEX_RELEASES) on every worker")
        store.get_dir(VERSION_DIR, staging)
        inventory_doc = store.read_json("inventory.json")
        images = local_images(run, inventory_doc)
        for index in store.read_json("rows.json"):
            path = images[inventory_doc["images"][index]["key"]]
            link_or_copy(path, staging / "images" / path.relative_to(run.mirror_dir))
    except BaseException:
        publisher.discard(staging)
        raise
    log.info("Staged %s index version %s on this worker from %s", run.index_type, saved["version"],
             store.location)
    return staging


def discard_unpublished(run: ClipRun, records: dict[str, dict[str, Any]]) -> None:
    """Remove the version ``index_save`` staged if ``publish`` did not make it live (rejected,
    timed out, failed): a staged version is never left behind by a finished run."""
    staging = records["index_save"]["facts"].get("staging")
    if staging and records["publish"]["status"] != "ok" and Path(staging).exists():
        log.info("Discarding the unpublished staged version %s", staging)
        run.publisher.discard(staging)


def _metadata_record(row: int, key: str, local_path: str, storage_url: str, products: dict[int, Any]) -> dict:
    parsed = parse_image_key(key)
    product = products.get(parsed.product_id) if parsed.product_id is not None else None
    return {
        "image_id": row,
        "local_path": local_path,
        "storage_url": storage_url,
        "product_id": parsed.product_id,
        "product_code": product.product_code if product else parsed.product_code,
        "product_name": product.product_name if product else None,
        "defect_type_id": parsed.defect_type_id,
        "defect_code": parsed.defect_code,
        "defect_name": None,  # the defect-type master is not part of the contract's tables
        "image_type": parsed.image_type,
        "file_name": parsed.file_name,
    }


def published_message(result_data: dict[str, Any]) -> str:
    """A published run's ``deployment_logs`` message, from its own ``result_data``.

    Every count it states is a ``num_*`` entry of ``result_data``, named after the list
    it counts, so the message and the lists a reader opens agree.
    """
    notes = [f"{result_data['embedded']} embedded", f"{result_data['cached']} cached"]
    if result_data["num_skipped_objects"]:
        notes.append(f"{counted(result_data['num_skipped_objects'], 'object')} skipped (see skipped_objects)")
    if result_data["num_unreadable_images"]:
        notes.append(f"{counted(result_data['num_unreadable_images'], 'image')} unreadable "
                     "(see unreadable_images)")
    if result_data["num_missing_images"]:
        notes.append(f"{result_data['num_missing_images']} MISSING (could not be downloaded; see missing_images)")
    return (f"{result_data['index_type']} index version {result_data['version']} published: "
            f"{counted(result_data['num_images'], 'image')} ({', '.join(notes)}), dim {result_data['embedding_dim']}"
            f"{' — RANDOM weights (demo/test only)' if result_data['random_weights'] else ''}")


def register(run: ClipRun) -> dict[str, Any]:
    """Close the run's ``deployment_logs`` row as completed or failed; return the outcome.

    Raises :class:`NothingToDo` when the run skipped the rebuild (no row is written). A
    cleared register whose run already closed its row and removed its work files (a
    completed run) returns what the row says instead of rewriting it as failed.
    """
    registry = DeploymentRegistry(run.settings.db_conn_id)
    records = read_stages(run.store, STAGES)
    if all(record["status"] == "not run" for record in records.values()):
        recorded = recorded_outcome(registry, run.dag_id, run.run_id)
        if recorded:
            return recorded
    if records["download"]["status"] == "skipped":
        raise NothingToDo(records["download"]["message"])
    discard_unpublished(run, records)
    failure = first_failure(records)
    downloaded, embedded, staged = (records[s]["facts"] for s in ("download", "embed", "index_save"))
    saved = records["publish"]["facts"]  # what is live after this run: published, or unchanged
    result_data = {
        "index_type": run.index_type,
        "source_prefix": run.prefix,
        "model": run.model,
        "pretrained": run.pretrained,
        "random_weights": embedded.get("random_weights", False),
        "num_images": saved.get("count", staged.get("count", embedded.get("images"))),
        "embedding_dim": embedded.get("embedding_dim"),
        "embedded": embedded.get("embedded"),
        "cached": embedded.get("cached"),
        "downloaded": downloaded.get("downloaded"),
        "mb_downloaded": downloaded.get("mb_downloaded"),
        # Each list may be shortened by cap_list; its count beside it is exact and is what the message says.
        "skipped_objects": downloaded.get("skipped", []),
        "num_skipped_objects": downloaded.get("num_skipped", len(downloaded.get("skipped", []))),
        "missing_images": downloaded.get("missing_images", []),
        "num_missing_images": downloaded.get("num_missing", 0),
        "unreadable_images": embedded.get("unreadable", []),
        "num_unreadable_images": embedded.get("num_unreadable", len(embedded.get("unreadable", []))),
        "version": saved.get("version"),
        "unchanged": bool(saved.get("unchanged")),
        "index_path": saved.get("path"),
        "staged_version": None if staged.get("unchanged") else staged.get("version"),
        "approval": approval.decision_facts(records[approval.STAGE]),
        "processing_time": round(sum(r.get("seconds", 0) for r in records.values()), 2),
        "stages": {s: r["status"] for s, r in records.items()},
    }
    if failure:
        stage, message = failure
        status = "failed"
        live = run.publisher.current(run.index_type)
        unchanged = f"The live index is unchanged ({'version ' + live if live else 'none published yet'})."
        blocked = approval.blocked_message(records[approval.STAGE]) if stage == approval.STAGE else None
        if blocked:
            text = (f"{run.index_type} index version {staged.get('version')} was not published: {blocked}. "
                    f"The staged version was discarded. {unchanged}")
        else:
            text = f"{run.index_type} index rebuild failed at {stage}: {message}. {unchanged}"
    elif saved.get("unchanged"):
        status = "completed"
        text = (f"{run.index_type} index unchanged, version {saved['version']} stays live: the same "
                f"{saved['count']} images and model as its build, so nothing was published")
    else:
        status = "completed"
        text = published_message(result_data)
    deploy_id = registry.finish(DEPLOY_TYPE, run.dag_id, run.run_id, status=status, message=text,
                                result_data=result_data, deployed_by=run.deployed_by)
    if status == "completed":
        run.store.remove_run()
    return {"deploy_id": deploy_id, "status": status, "message": text, **{
        k: result_data[k] for k in ("num_images", "embedding_dim", "version", "index_path", "model", "pretrained")}}
