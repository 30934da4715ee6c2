"""The CLIP index's closing steps: what the approver sees, ``publish`` (make the staged version live), ``register``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from inspection_refresh import compose
from inspection_refresh.files import link_or_copy, tree_files
from inspection_refresh.progress import counted
from inspection_refresh.publish import PublishError
from inspection_refresh.runtime import refuse_publishing_if_run_ended
from inspection_refresh.tasks import approval, gating
from inspection_refresh.tasks.clip_index.run import (
    DEPLOY_TYPE, STAGES, VERSION_DIR, ClipRun, local_images, published_manifest,
)
from inspection_refresh.tasks.common import NothingToDo, live_version, lost_race, read_json, recorded_outcome
from inspection_refresh.tasks.stages import first_failure, read_stages, record_stage

log = logging.getLogger(__package__)  # the pipeline's one logger, named as before it was split

STAGED_ELSEWHERE = ("images",)
"""What the approval's digest leaves out of a staged version: its images, linked from the mirror at publish
and named by its ``manifest.json`` (``source_fingerprint``: key, ETag and size of each)."""


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
    new_urls = _indexed_image_urls(store)  # what the new version indexes: not the unreadable or missing images
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
        "images_downloaded": downloaded.get("files"), "images_indexed": after,
    }
    delta = f" ({after - before:+d})" if before is not None else ""
    lines = [
        f"**{run.dag_id}** would publish **{run.index_type}** index version `{saved['version']}`"
        + (f", replacing the live version `{live_version}`." if live_version else " (no index is live yet)."),
        "",
        approval.markdown_table(["", f"Live ({live_version or 'none'})", f"New ({saved['version']})"], [
            ["Indexed images", before, f"{after}{delta}"],
            ["Embedding dim", summary["dim_before"], summary["dim_after"]],
            ["Model", (live or {}).get("model") and f"{live.get('model')} / {live.get('pretrained')}", summary["model"]],
        ]),
        "",
        image_changes(before, after, added, removed, old_urls is not None),
        image_intake(downloaded, embedded, after),
        "",
        f"**Self-retrieval check: {'passed' if saved.get('verified') else 'NOT passed'}** — every one of the {after} "
        f"images finds itself first ({ties} exact-duplicate ties).",
    ]
    if summary["random_weights"]:
        lines += ["", "⚠ Embedded with RANDOM weights (demo/test checkpoint): similarity scores are meaningless."]
    lines += ["", f"**Approve** publishes it. **Reject** keeps "
                  f"{'version ' + live_version if live_version else 'nothing'} live and discards the new version."]
    named = approval.target(saved["version"], store.kept_files(VERSION_DIR, saved, skip=STAGED_ELSEWHERE))
    lines += ["", f"Approving names version `{saved['version']}` with files sha256 `{named['sha256']}`: publish "
                  "refuses any other (e.g. one rebuilt by clearing index_save)."]
    subject = (f"Publish {run.index_type} index version {saved['version']}: {after} images"
               + (f" (live: {before})" if before is not None else ""))
    return approval.ApprovalRequest(subject=subject, body="\n".join(lines), summary=summary,
                                    targets={run.index_type: named})


def _indexed_image_urls(store: Any) -> set[str]:
    """The storage URLs of the images the staged version indexes (``rows.json``: the inventory rows embed read)."""
    inventory = store.read_json("inventory.json")
    keys = [inventory["images"][row]["key"] for row in store.read_json("rows.json")]
    return {inventory["storage_urls"][key] for key in keys}


def _file_names(urls: list[str], limit: int = 10) -> str:
    return ", ".join(u.rsplit("/", 1)[-1] for u in urls[:limit]) + (" …" if len(urls) > limit else "")


def image_changes(before: int | None, after: int, added: list[str], removed: list[str], known: bool = True) -> str:
    """The approval's line of indexed images the new version adds and removes, which add up:
    ``before + added - removed = after`` when the live version's images are ``known``."""
    if before is None:
        return f"Indexed images: {after} (no index is live yet)."
    if not known:
        return f"Indexed images: {before} → {after} (the live version's list could not be read: no added/removed)."
    line = f"Indexed images: {before} → {after}: {len(added)} added, {len(removed)} removed"
    line += f" (added: {_file_names(added)})" if added else ""
    line += f" (removed: {_file_names(removed)})" if removed else ""
    return line + "."


def image_intake(downloaded: dict[str, Any], embedded: dict[str, Any], indexed: int) -> str:
    """What became of the prefix's objects, adding up: ``downloaded = unreadable + indexed``, with what
    was skipped (not images) and missing (could not be downloaded) beside it."""
    unreadable = [key for key, _ in embedded.get("unreadable", [])]
    num_unreadable = embedded.get("num_unreadable", len(unreadable))
    parts = [f"downloaded {downloaded.get('files', indexed + num_unreadable)}"]
    if num_unreadable:
        parts.append(f"unreadable {num_unreadable} (skipped: {_file_names([str(k) for k in unreadable])})")
    parts.append(f"indexed {indexed}")
    if downloaded.get("num_missing"):
        parts.append(f"missing {downloaded['num_missing']} (could not be downloaded)")
    if downloaded.get("num_skipped"):
        parts.append(f"{counted(downloaded['num_skipped'], 'other object')} skipped (not images)")
    return "Images: " + ", ".join(parts) + "."


def publish(run: ClipRun) -> dict[str, Any]:
    """Make the version ``index_save`` staged live, atomically, if the approval step allowed it.

    An unchanged index publishes nothing ("version X stays live"). Raises :class:`NothingToDo`
    when the approval step rejected the version (or did not answer); its staging directory is
    left for ``register`` to discard, so a retried publish can still use it. With the ``storage``
    run store the version is staged on this worker from the store by each try (:func:`_new_staging`,
    :func:`_link_images`), and discarded if that try fails.
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
        # A retry of a try that went live and then failed (a timeout after the swap) completes.
        release = run.publisher.published(run.index_type, version)
        if release is None:
            with store.fetch_dir(VERSION_DIR, saved, lambda: _new_staging(run, saved),
                                 refill=lambda staging: _link_images(run, staging, saved),
                                 discard=run.publisher.discard, keep_in_place=True) as staging:
                if not staging.is_dir():
                    raise PublishError(f"the staged {what} at {staging} is gone; rerun the DAG")
                approval.require_as_approved(store, run.index_type, what, lambda: approval.target(
                    version, tree_files(staging, skip=STAGED_ELSEWHERE)))
                refuse_publishing_if_run_ended(run.dag_id, run.run_id, what)
                # A manual run replaces a rollback's pin; a scheduled one never publishes over it.
                release = run.publisher.publish(run.index_type, staging, version, unpin=not run.scheduled)
        stage.facts = {"version": release.version, "path": str(run.publisher.live_path(run.index_type)),
                       "count": saved["count"], "dim": saved["dim"], "verified": saved.get("verified")}
        log.info("Published %s index version %s: %d images, dim %d, at %s", run.index_type, release.version,
                 saved["count"], saved["dim"], stage.facts["path"])
        return dict(stage.facts)


def _new_staging(run: ClipRun, saved: dict[str, Any]) -> Path:
    """A staging directory on this worker for the version ``index_save`` kept in the run store, refused
    (and removed) if this worker would publish it elsewhere than the gallery paths it names."""
    publisher = run.publisher
    staging = publisher.stage(run.index_type)  # also removes what an interrupted try left
    gallery_root = staging.parent / saved["version"] / "images"
    if saved.get("gallery_root") and Path(saved["gallery_root"]) != gallery_root:
        publisher.discard(staging)
        raise PublishError(
            f"the {run.index_type} index version {saved['version']} names its images under "
            f"{saved['gallery_root']}, but this worker would publish it under {gallery_root}: set the same "
            "INSPECTION_INDEX_ROOT (and INSPECTION_INDEX_RELEASES) on every worker")
    return staging


def _link_images(run: ClipRun, staging: Path, saved: dict[str, Any]) -> None:
    """Complete a version fetched from the run store (which keeps it without its images): its images,
    hard-linked from this worker's mirror at the gallery paths it names."""
    store = run.store
    inventory_doc = store.read_json("inventory.json")
    images = local_images(run, inventory_doc)
    for index in store.read_json("rows.json"):
        path = images[inventory_doc["images"][index]["key"]]
        link_or_copy(path, staging / "images" / path.relative_to(run.mirror_dir))
    log.info("Staged %s index version %s on this worker from %s", run.index_type, saved["version"],
             store.location)


def discard_unpublished(run: ClipRun, records: dict[str, dict[str, Any]]) -> bool:
    """Remove the version ``index_save`` staged if ``publish`` did not make it live and will not retry it
    (rejected, timed out, not run). One whose ``publish`` failed is kept (returns True), so clearing
    ``publish`` retries the publish, not the build; the DAG's next ``index_save`` removes it. Not one
    that lost to a rollback or a newer version: there is nothing to retry."""
    publish = records["publish"]
    if publish["status"] == "failed" and not lost_race(publish["message"]):
        return True
    staging = records["index_save"]["facts"].get("staging")
    if staging and records["publish"]["status"] != "ok" and Path(staging).exists():
        log.info("Discarding the unpublished staged version %s", staging)
        run.publisher.discard(staging)
    return False


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
    registry = compose.deployment_registry(run.settings.db_conn_id)
    records = read_stages(run.store, STAGES)
    if all(record["status"] == "not run" for record in records.values()):
        recorded = recorded_outcome(registry, run.dag_id, run.run_id)
        if recorded:
            return recorded
    if records["download"]["status"] == "skipped":
        raise NothingToDo(records["download"]["message"])
    kept = discard_unpublished(run, records)
    failure = first_failure(records)
    downloaded, embedded, staged = (records[s]["facts"] for s in ("download", "embed", "index_save"))
    saved = records["publish"]["facts"]  # what is live after this run: published, or unchanged
    live = live_version(run.publisher, run.index_type) if failure else None
    late_failure = None
    if failure and failure[0] == "publish" and staged.get("version") and live == staged["version"]:
        late_failure, failure = failure[1], None  # the swap happened, then publish failed: the row says it is live
        saved = {"version": live, "path": str(run.publisher.live_path(run.index_type)), "count": staged.get("count")}
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
        "quality": staged.get("hygiene"),  # the gallery check of the version this run built
        "quality_gate": gating.gate_facts(run.store),
        "processing_time": round(sum(r.get("seconds", 0) for r in records.values()), 2),
        "stages": {s: r["status"] for s, r in records.items()},
    }
    if failure:
        stage, message = failure
        status = "failed"
        unchanged = f"The live index is unchanged ({'version ' + live if live else 'none published yet'})."
        blocked = approval.blocked_message(records[approval.STAGE]) if stage == approval.STAGE else None
        lost = lost_race(message) if stage == "publish" else None
        if lost:
            text = f"{run.index_type} index version {staged.get('version')}: {lost}"
        elif blocked:
            text = (f"{run.index_type} index version {staged.get('version')} was not published: {blocked}. "
                    f"The staged version was discarded. {unchanged}")
        else:
            text = f"{run.index_type} index rebuild failed at {stage}: {message}. {unchanged}"
            if kept and stage == "publish":
                text += (f" The staged version {staged.get('version')} is kept: clearing publish retries "
                         "publishing it without a rebuild.")
    elif saved.get("unchanged"):
        status = "completed"
        text = (f"{run.index_type} index unchanged, version {saved['version']} stays live: the same "
                f"{saved['count']} images and model as its build, so nothing was published")
    else:
        status = "completed"
        text = gating.with_note(published_message(result_data), gating.flagged_note(run.store))
        if late_failure:
            text += f". It is live; the publish task failed after the swap: {late_failure}"
    deploy_id = registry.finish(DEPLOY_TYPE, run.dag_id, run.run_id, status=status, message=text,
                                result_data=result_data, deployed_by=run.deployed_by)
    if status == "completed":
        run.store.remove_run()
    return {"deploy_id": deploy_id, "status": status, "message": text, **{
        k: result_data[k] for k in ("num_images", "embedding_dim", "version", "index_path", "model", "pretrained")}}
