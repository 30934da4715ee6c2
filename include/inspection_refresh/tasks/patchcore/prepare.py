"""The PatchCore run's first steps: ``list_products`` (what to build) and ``prepare_product`` (mirror a
product's images, decide whether it needs a build, and give the build its environment)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from inspection_refresh import compose
from inspection_refresh.images import DEFECT_PREFIX, NORMAL_PREFIX, reject_reason
from inspection_refresh.live import Releases
from inspection_refresh.progress import reporting_progress
from inspection_refresh.publish import PublishError, check_name, describe_pin
from inspection_refresh.registry import Product, RegistryError
from inspection_refresh.runtime import PermanentError, finished_run_state
from inspection_refresh.storage import SYNC_STATE_FILE, ObjectStorage, SyncResult, require_complete
from inspection_refresh.tasks.common import NothingToDo, cap_list, read_json, unpin_hint
from inspection_refresh.tasks.live_progress import run_reporter
from inspection_refresh.tasks.patchcore.build import build_environment
from inspection_refresh.tasks.patchcore.run import (
    DEPLOY_TYPE, INVENTORY, PatchcoreRun, allowed_scripts, db_configured,
)
from inspection_refresh.tasks.stages import record_stage

log = logging.getLogger(__package__)  # the pipeline's one logger, named as before it was split


def _products_from_storage(storage: ObjectStorage) -> list[Product]:
    """No product master: one product per ``images/normal/{product_id}/`` folder.

    The code is the file names' common ``{product_code}_`` prefix when they share
    one, else ``product_{id}``.
    """
    names: dict[int, Counter] = {}
    for obj in storage.list_objects(NORMAL_PREFIX):
        parts = obj.key[len(NORMAL_PREFIX):].split("/")
        if len(parts) == 2 and parts[0].isdigit() and reject_reason(obj) is None:
            names.setdefault(int(parts[0]), Counter())[parts[1].split("_")[0]] += 1
    products = []
    for product_id, counts in sorted(names.items()):
        code, count = counts.most_common(1)[0]
        usable = count == sum(counts.values()) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", code)
        products.append(Product(product_id, code if usable else f"product_{product_id}"))
    return products


def list_products(run: PatchcoreRun) -> list[dict[str, Any]]:
    """Products to build: active rows of ``products`` (or storage folders), narrowed by the param."""
    store = run.store
    store.sweep()  # what failed runs left, after INSPECTION_RUN_RETENTION_DAYS
    store.remove_run()  # a cleared-and-rerun run starts clean
    with record_stage(store, "list_products"):
        return _list_products(run)


def _list_products(run: PatchcoreRun) -> list[dict[str, Any]]:
    registry = compose.deployment_registry(run.settings.db_conn_id)
    use_db = db_configured(run.settings.db_conn_id)
    products: list[Product] | None = None
    source = "products table"
    if use_db:
        registry.close_abandoned_runs(run.dag_id, run.run_id, finished_run_state)
        registry.start(DEPLOY_TYPE, run.dag_id, run.run_id, deployed_by=run.deployed_by,
                       details={"products_requested": list(run.products) or "all"})
        try:
            products = registry.active_products()
        except RegistryError as exc:
            if "doesn't exist" not in str(exc):
                raise
            log.warning("No products table in %r; taking products from the storage folders", run.settings.db_conn_id)
    if products is None:
        source = "storage folders"
        products = _products_from_storage(compose.object_storage(run.settings.storage_conn_id))
    if run.products:
        wanted = set(run.products)
        unknown = wanted - {p.product_code for p in products} - {str(p.product_id) for p in products}
        if unknown:
            raise PermanentError(unknown_products_message(sorted(unknown), products, source))
        products = [p for p in products if p.product_code in wanted or str(p.product_id) in wanted]
    pinned = _pinned_products(run, products) if run.scheduled else {}
    products = [p for p in products if p.product_code not in pinned]
    if not products and not pinned:
        raise PermanentError(f"no products to build (from the {source}); add products or upload normal images "
                             f"under {NORMAL_PREFIX}{{product_id}}/")
    chosen = [_mapped_product(p, products) for p in products]
    run.store.write_json("products.json", {"source": source, "products": chosen, "pinned": pinned, "history": use_db})
    log.info("Building %d PatchCore banks (products from the %s): %s", len(chosen), source,
             ", ".join(p["product_code"] for p in chosen))
    return chosen


def unknown_products_message(unknown: list[str], products: list[Product], source: str) -> str:
    """One line for a run asked to build products that do not exist or are inactive: which, and the known ones."""
    known = ", ".join(f"{p.product_code} ({p.product_id})" for p in products) or "none"
    return (f"unknown or inactive product code{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}. "
            f"Active products (code and id, from the {source}): {known}. Trigger again with some of these, "
            "or with products empty for all")


def _mapped_product(product: Product, products: list[Product]) -> dict[str, Any]:
    """One mapped task's product. A code that cannot name a directory, or that several products
    share, fails only this product (at prepare) with ``problem``; its files and results go under
    ``product_<id>`` instead, so it can never collide with another product's mirror or staging."""
    code = product.product_code
    sharing = [p.product_id for p in products if p.product_code == code]
    problem = None
    try:
        check_name(code)
    except PublishError:
        problem = (f"product code {code!r} (product_id {product.product_id}) cannot name a directory in the "
                   "PatchCore root: use letters, digits, '.', '_' or '-' in products.product_code")
    if problem is None and len(sharing) > 1:
        problem = (f"product code {code!r} is used by products {sharing}: the service finds a bank by its code, so "
                   "codes must be unique; fix products.product_code (or deactivate one)")
    return {"product_id": product.product_id, "product_code": f"product_{product.product_id}" if problem else code,
            "label": code, "product_name": product.product_name, "problem": problem}


def _pinned_products(run: PatchcoreRun, products: list[Product]) -> dict[str, dict[str, Any]]:
    """Product code -> pin, for the products a rollback pinned: scheduled runs leave them out."""
    publisher = run.publisher
    pinned = {p.product_code: pin for p in products if (pin := publisher.pinned(p.product_code))}
    for code, pin in pinned.items():
        log.warning("Leaving out product %s: its bank is %s. %s", code, describe_pin(pin), unpin_hint(code))
    return pinned


def _images_fingerprint(directory: Path) -> str:
    """Names, sizes and contents of the images under ``directory``: the mirror, or a published bank's ``ok/``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != SYNC_STATE_FILE):
        with open(path, "rb") as handle:
            content = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"{path.relative_to(directory).as_posix()}\t{path.stat().st_size}\t{content}\n".encode())
    return digest.hexdigest()


def _unchanged_live_bank(run: PatchcoreRun, code: str, ok_dir: Path) -> str | None:
    """The live version of ``code`` if it was built from these normal images with this run's settings.

    Compares the live bank's ``ok/`` with the mirror, and its ``bank_config.json`` with the
    requested settings as publishing validates them, plus the coreset size. A run with another
    build script than the default always builds: nothing records which script built the live bank.
    The live version is the release channel's with one (another worker may have published it); it is
    compared through this worker's kept copy of it, and a worker without one builds.
    """
    from inspection_refresh.patchcore.bank import CONFIG_FILE, validate_bank
    from inspection_refresh.patchcore.options import BankValidationError

    releases = Releases(run.publisher)
    version = releases.current(code)
    other_script = str(run.script_path) != allowed_scripts(run.settings)[0]
    if version is None or other_script:
        return None
    live = releases.local_copy(code, version)
    if live is None:
        log.info("Product %s: the live bank %s (the release channel's) is not kept on this worker, so it cannot "
                 "be compared; building", code, version)
        return None
    if _images_fingerprint(live / "ok") != _images_fingerprint(ok_dir):
        return None
    try:
        validate_bank(live, run.expected_config())
        recorded_coreset = (read_json(live / CONFIG_FILE).get("coreset") or {}).get("coreset")
    except (BankValidationError, OSError, ValueError) as exc:
        log.info("Product %s: same images, but the live bank %s differs from this run's settings (%s)",
                 code, version, exc)
        return None
    return version if recorded_coreset == run.coreset else None


def prepare_product(run: PatchcoreRun, product: dict[str, Any]) -> dict[str, str]:
    """Mirror the product's normal (and labelled defect) images; return the build script's environment.

    Any image that still fails after the sync's retries fails the task (transiently,
    so Airflow retries it): a bank is never built from part of the product's images.
    Where the run store lets this task settle the build's paths ahead (:meth:`RunStore.settle_ahead`,
    ``local``) the environment is complete and the bank is built into a staging directory made here;
    else it is the contract only, which the build task completes on its own worker (:func:`fetch_build_inputs`).
    """
    code, product_id = product["product_code"], product["product_id"]
    store = run.product_store(code)
    with record_stage(store, "download") as stage:
        if product.get("problem"):
            raise PermanentError(product["problem"])
        storage = compose.object_storage(run.settings.storage_conn_id, max_transfers=run.settings.patchcore_transfers)
        cache = run.mirror_dir(code)
        prefix = f"{NORMAL_PREFIX}{product_id}/"
        # The download figures also go to the Deployments page (the run's row, when there is a database).
        with reporting_progress(run_reporter(run, f"prepare {code}") if db_configured(run.settings.db_conn_id)
                                else None):
            normal = storage.sync_prefix(prefix, cache / "ok", accept=reject_reason)
            if not normal.files and not normal.failed:
                raise PermanentError(f"product {code}: no normal images under s3://{storage.bucket}/{prefix} "
                                     f"({len(normal.skipped)} other objects); upload some before building its bank")
            # Labelled defects (images/defect/{product_id}_{defect_type_id}/) only score the held-out AUROC.
            defects = storage.sync_prefix(f"{DEFECT_PREFIX}{product_id}_", cache / "defects", accept=reject_reason)
        require_complete(normal, defects)
        unchanged = _unchanged_live_bank(run, code, cache / "ok")
        if unchanged:  # an identical bank would only push distinct older versions out of the kept ones
            stage.facts = {"images": len(normal.files), "unchanged": unchanged}
            log.info("%s: unchanged since version %s (same %d normal images and settings); nothing to build",
                     code, unchanged, len(normal.files))
            raise NothingToDo(f"product {code}: unchanged, version {unchanged} stays live (the same "
                              f"{len(normal.files)} normal images and settings as its build)")
        # Exactly these versions of the images, for a build or publish on another worker.
        store.write_json(INVENTORY, {"ok": _inventory(normal), "defects": _inventory(defects)})
        stage.facts = {"images": len(normal.files), "defect_images": len(defects.files),
                       "skipped": cap_list([list(s) for s in normal.skipped]), "num_skipped": len(normal.skipped)}
        log.info("Product %s: %d normal images (%d downloaded, %d unchanged), %d labelled defect images",
                 code, len(normal.files), normal.downloaded, normal.unchanged, len(defects.files))
        contract = {
            "PRODUCT_CODE": code,
            "PATCHCORE_SHORTER": str(run.shorter),
            "PATCHCORE_STRIDE": str(run.stride),
            "PATCHCORE_LAYERS": ",".join(run.layers),
            "PATCHCORE_CORESET": str(run.coreset),
            "PATCHCORE_WEIGHTS": run.weights,
            "PATCHCORE_DEVICE": run.device,
            "PATCHCORE_SCRIPT": str(run.script_path),
        }

        def place_build() -> dict[str, str]:  # local: the build runs on this disk, into a staging dir made now
            staging = run.publisher.stage(code)
            stage.facts["staging"] = str(staging)
            return build_environment(run, contract, out_dir=staging, defect_files=defects.files.values(),
                                     log_dir=store.workspace(run.build_dir(code)))

        # storage: paths, PYTHON and the inherited variables are the build worker's (fetch_build_inputs).
        return store.settle_ahead(place_build, otherwise=contract)


def _inventory(result: SyncResult) -> dict[str, Any]:
    """What a sync mirrored: its prefix and each object's key, ETag and size (for :func:`materialise_images`)."""
    return {"prefix": result.prefix, "images": [
        {"key": key, "etag": result.etags[key], "size": path.stat().st_size} for key, path in sorted(result.files.items())]}
