"""The CLIP index's build steps: ``download`` (mirror the images), ``embed``, ``index_save`` (stage a version)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from inspection_refresh import compose
from inspection_refresh.files import link_or_copy
from inspection_refresh.images import parse_image_key, reject_reason
from inspection_refresh.progress import counted, reporting_progress
from inspection_refresh.publish import describe_pin, new_version_id
from inspection_refresh.registry import RegistryError
from inspection_refresh.runstore import RunStore
from inspection_refresh.runtime import finished_run_state, refuse_publishing_if_run_ended
from inspection_refresh.storage import StorageError, plan_mirror, require_complete
from inspection_refresh.tasks.clip_index.quality import gallery_hygiene
from inspection_refresh.tasks.clip_index.run import (
    DEPLOY_TYPE, VERSION_DIR, ClipRun, local_images, source_fingerprint, unchanged_live_index,
)
from inspection_refresh.tasks.common import NothingToDo, cap_list, unpin_hint
from inspection_refresh.tasks.live_progress import run_reporter
from inspection_refresh.tasks.stages import record_stage

log = logging.getLogger(__package__)  # the pipeline's one logger, named as before it was split


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
        storage = compose.object_storage(run.settings.storage_conn_id, max_transfers=run.settings.max_transfers)
        storage.check_access()
        listing = list(storage.list_objects(run.prefix))
        candidates = [obj for obj, _ in plan_mirror(listing, run.prefix, run.mirror_dir, reject_reason)[0].values()]
        if (run.scheduled or run.skip_if_unchanged) and not run.full_rebuild:
            _skip_if_unchanged(run, source_fingerprint(run.prefix, candidates))

        registry = compose.deployment_registry(run.settings.db_conn_id)
        registry.close_abandoned_runs(run.dag_id, run.run_id, finished_run_state)
        registry.start(DEPLOY_TYPE, run.dag_id, run.run_id, deployed_by=run.deployed_by,
                       details={"index_type": run.index_type, "source_prefix": run.prefix})
        if not candidates:
            raise StorageError(
                f"no images under s3://{storage.bucket}/{run.prefix} ({len(listing)} other objects): "
                "upload images there or choose another prefix; the published index is unchanged"
            )
        with reporting_progress(run_reporter(run, "download")):  # the figures also go to the Deployments page
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


def _skip_if_unchanged(run: ClipRun, fingerprint: str) -> None:
    manifest = unchanged_live_index(run, fingerprint)
    if manifest:
        unchanged = NothingToDo(
            f"images under {run.prefix} are unchanged since the published {run.index_type} index "
            f"(version {run.live_version()}, {manifest.get('count')} images, same model): "
            "skipping the rebuild. Trigger with full_rebuild=true to force one."
        )
        log.info("%s", unchanged)  # the task is skipped: its log says why
        raise unchanged


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
        with reporting_progress(run_reporter(run, "embed")):  # the figures also go to the Deployments page
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


def _save_vectors(store: RunStore, vectors: Any) -> None:
    import numpy as np

    with store.writing("vectors.npy") as path:  # local: straight into the work directory, as before
        np.save(path, vectors)


def _load_vectors(store: RunStore) -> Any:
    import numpy as np

    with store.reading("vectors.npy") as path:
        return np.load(path)


def _product_lookup(run: ClipRun) -> dict[int, Any]:
    try:
        return compose.deployment_registry(run.settings.db_conn_id).products_by_id()
    except RegistryError as exc:
        log.warning("No product names in the metadata (products table unavailable: %s)", exc)
        return {}


def index_save(run: ClipRun) -> dict[str, Any]:
    """Write every service format into a staging version and verify it; ``publish`` makes it live.

    Records the staged version (``staging``, ``version``, ``count``, ``dim`` and the self-retrieval
    check) for the approval step and ``publish``. The run store keeps the version (:meth:`RunStore.keep_dir`):
    with ``local`` it stays staged where it is; with ``storage`` its files (not its images) are stored
    and nothing stays staged on this worker. When the
    images and the model are those of the live index nothing is staged (``unchanged``).
    """
    from inspection_refresh.clip.index import verify_index, write_index_files
    from inspection_refresh.clip.weights import model_identity

    store = run.store
    with record_stage(store, "index_save") as stage:
        downloaded = store.read_json("stage-download.json")["facts"]
        live = None if run.full_rebuild else unchanged_live_index(run, downloaded["source_fingerprint"])
        if live:  # an identical version would only push distinct older versions out of the kept ones
            stage.facts = {"unchanged": True, "version": run.live_version(),
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
            hygiene, image_sha256 = gallery_hygiene(
                run, vectors, [inventory[index]["key"] for index in rows],
                [images[inventory[index]["key"]] for index in rows], [_product_of(m) for m in metadata])
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
                    "quality": hygiene,  # what the gallery check found (the console shows it)
                    "image_sha256": image_sha256,  # the other gallery's runs compare against these
                },
            )
            verified = verify_index(staging)
            # A run an operator ended while this wrote has nothing to stage for.
            refuse_publishing_if_run_ended(run.dag_id, run.run_id, f"{run.index_type} index version {version}")
            # publish may run on another worker: it rebuilds this directory from the kept version files and
            # its own mirror's images (same gallery paths). local: it stays staged here, where publish finds it.
            kept = store.keep_dir(VERSION_DIR, staging, skip=["images"])
            store.release(staging, publisher.discard)
        except BaseException:
            publisher.discard(staging)
            raise
        stage.facts = {"version": version, "count": manifest["count"], "dim": manifest["dim"],
                       "verified": bool(verified), "self_top1": verified.get("self_top1"),
                       "ties": verified.get("ties"), "gallery_root": str(final_dir / "images"),
                       "hygiene": hygiene}
        stage.facts.update(kept)  # local: where the staged version is ("staging")
        log.info("Staged %s index version %s: %d images, dim %d, every image finds itself first (%d exact-"
                 "duplicate ties); publish makes it live", run.index_type, version, manifest["count"],
                 manifest["dim"], verified.get("ties", 0))
        return {k: v for k, v in stage.facts.items() if k not in ("staging", "gallery_root", "hygiene")}


def _product_of(record: dict[str, Any]) -> str | None:
    """An image's product for the hygiene check: its code, else its id (``None``: unknown)."""
    if record.get("product_code"):
        return str(record["product_code"])
    return None if record.get("product_id") is None else str(record["product_id"])


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
