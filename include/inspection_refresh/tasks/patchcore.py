"""The PatchCore pipeline as plain functions, one per Airflow task of ``patchcore_memory_bank``.

``list_products`` -> per product: ``prepare_product`` (download) -> build (``build_patchcore.sh``
via BashOperator) -> one ``approve`` step for the whole run (``airflow_support.PublishApproval``,
showing :func:`approval_request`; passes at once unless the run requires approval) -> per product:
``publish_product`` (validate + atomic publish) -> ``register``.

Every product has its own stage records, so one product's failure never stops
the others from publishing, and the history row names what failed and why.

Tasks hand each other files through the run's :class:`~inspection_refresh.runstore.RunStore`
(``INSPECTION_RUN_STORE``): with ``local`` (one host) the run's work directory, the image mirror
and a staging directory that ``build_patchcore.sh`` writes into, as always; with ``storage`` each
task may run on another worker: ``prepare`` records the product's image inventories, the build
task fetches them into its own worker's mirror and stores the bank it built
(:func:`fetch_build_inputs`, :func:`store_build_outputs`), and ``publish`` stages that bank on its
own worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from inspection_refresh.airflow_support import PermanentError, finished_run_state, refuse_publishing_if_run_ended
from inspection_refresh.config import Settings, get_settings
from inspection_refresh.files import copy_tree_linked
from inspection_refresh.images import DEFECT_PREFIX, NORMAL_PREFIX, reject_reason
from inspection_refresh.patchcore.options import LAYER_CHANNELS, BuildOptions
from inspection_refresh.publish import Publisher, PublishError, check_name, describe_pin
from inspection_refresh.registry import DeploymentRegistry, Product, RegistryError
from inspection_refresh.runstore import RunFileMissing, RunStore, materialise_images
from inspection_refresh.storage import SYNC_STATE_FILE, ObjectStorage, SyncResult, require_complete
from inspection_refresh.tasks.common import (
    NothingToDo, cap_list, read_json, recorded_outcome, run_work_dir, safe_run_id, unpin_hint,
)
from inspection_refresh.tasks import approval
from inspection_refresh.tasks.stages import record_stage

log = logging.getLogger(__name__)

DEPLOY_TYPE = "patchcore_create"
PIPELINE = "patchcore"
BUNDLED_SCRIPT = Path(__file__).resolve().parents[1] / "build_patchcore.sh"
SUMMARY_MARK = "PATCHCORE_SUMMARY "  # the builder's last stdout line, kept in the build log
LAYERS = tuple(LAYER_CHANNELS)
INVENTORY = "inventory.json"
"""Per product in the run store: the ``ok`` and ``defects`` images ``prepare`` mirrored (key, ETag, size)."""
BUILD_LOG = "build.log"
BANK_DIR = "bank"
"""Per product in the ``storage`` run store: the bank the build wrote (its ``OUT_DIR``)."""
"""The ResNet-50 stages the service understands (one list, the builder's)."""
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
        return RunStore.for_run(PIPELINE, self.run_id, self.settings, storage=self.mirror_storage())

    def product_store(self, code: str) -> RunStore:
        """The product's part of the run store: its stage records, inventory, build log and built bank."""
        return self.store.within(check_name(code))

    def mirror_storage(self) -> ObjectStorage:
        """Object storage for filling this worker's mirror and for the run store (``INSPECTION_MIRROR_TRANSFERS``)."""
        return ObjectStorage(self.settings.storage_conn_id, max_transfers=self.settings.mirror_transfers)

    def mirror_dir(self, code: str) -> Path:
        """This worker's mirror of a product's images: ``ok/`` (normal) and ``defects/``; kept between runs."""
        return self.settings.cache_root / PIPELINE / check_name(code)

    def build_dir(self, code: str) -> Path:
        """This worker's scratch directory of a build with the ``storage`` run store: ``bank/`` and ``build.log``."""
        return self.settings.cache_root / PIPELINE / "builds" / safe_run_id(self.run_id) / check_name(code)

    @property
    def publisher(self) -> Publisher:
        return self.settings.patchcore_publisher()

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


def _db_configured(conn_id: str) -> bool:
    try:
        from airflow.sdk import BaseHook

        BaseHook.get_connection(conn_id)
        return True
    except Exception:
        return False


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
    registry = DeploymentRegistry(run.settings.db_conn_id)
    use_db = _db_configured(run.settings.db_conn_id)
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
        products = _products_from_storage(ObjectStorage(run.settings.storage_conn_id))
    if run.products:
        wanted = set(run.products)
        unknown = wanted - {p.product_code for p in products} - {str(p.product_id) for p in products}
        if unknown:
            raise PermanentError(f"unknown or inactive products requested: {sorted(unknown)}; "
                                 f"known: {[p.product_code for p in products]}")
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
    """
    from inspection_refresh.patchcore.bank import CONFIG_FILE, validate_bank
    from inspection_refresh.patchcore.options import BankValidationError

    version = run.publisher.current(code)
    live = run.publisher.live_path(code)
    other_script = str(run.script_path) != allowed_scripts(run.settings)[0]
    if version is None or other_script or _images_fingerprint(live / "ok") != _images_fingerprint(ok_dir):
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
    """
    code, product_id = product["product_code"], product["product_id"]
    store = run.product_store(code)
    with record_stage(store, "download") as stage:
        if product.get("problem"):
            raise PermanentError(product["problem"])
        storage = ObjectStorage(run.settings.storage_conn_id, max_transfers=run.settings.patchcore_transfers)
        cache = run.mirror_dir(code)
        prefix = f"{NORMAL_PREFIX}{product_id}/"
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
        if store.backend == "storage":
            # Paths, PYTHON and the inherited variables are the build worker's: fetch_build_inputs adds them.
            return contract
        staging = run.publisher.stage(code)
        stage.facts["staging"] = str(staging)
        return script_environment({
            **contract,
            "OK_DIR": str(cache / "ok"),
            "OUT_DIR": str(staging),
            "DEFECT_DIRS": ":".join(_defect_dirs(defects.files.values())),
            "PATCHCORE_LOG": str(store.local_dir / BUILD_LOG),
            "PYTHON": sys.executable,
        })


def _inventory(result: SyncResult) -> dict[str, Any]:
    """What a sync mirrored: its prefix and each object's key, ETag and size (for :func:`materialise_images`)."""
    return {"prefix": result.prefix, "images": [
        {"key": key, "etag": result.etags[key], "size": path.stat().st_size} for key, path in sorted(result.files.items())]}


def _defect_dirs(paths) -> list[str]:
    """The directories of the labelled defect images (one per defect type), for ``DEFECT_DIRS``."""
    return sorted({str(Path(path).parent) for path in paths})


def _materialise(run: PatchcoreRun, code: str, part: str) -> SyncResult:
    """Bring this worker's mirror of ``part`` (``ok`` or ``defects``) of ``code`` to the run's inventory."""
    listed = run.product_store(code).read_json(INVENTORY)[part]
    result = materialise_images(run.mirror_storage(), listed["prefix"], listed["images"], run.mirror_dir(code) / part)
    require_complete(result)
    return result


def fetch_build_inputs(run: PatchcoreRun, task: Any) -> None:
    """Before the build task runs its command (its ``pre_execute``), on the build worker.

    With the ``storage`` run store: fills this worker's mirror with the product's ``ok/`` and defect
    images as ``prepare`` recorded them, creates a fresh local ``OUT_DIR`` and completes the script's
    environment (``OK_DIR``, ``OUT_DIR``, ``DEFECT_DIRS``, ``PATCHCORE_LOG``, ``PYTHON`` and the
    inherited variables, all of this worker). It runs in the task's own process, not in the
    command: only the task process may read Airflow connections, and the script must not see them.
    With ``local`` the environment ``prepare`` returned is already complete: nothing to do.
    """
    env = dict(task.env or {})
    code = env["PRODUCT_CODE"]
    if run.product_store(code).backend == "local":
        return
    ok, defects = _materialise(run, code, "ok"), _materialise(run, code, "defects")
    workspace = run.build_dir(code)
    shutil.rmtree(workspace, ignore_errors=True)  # what an earlier try left
    (workspace / "bank").mkdir(parents=True)
    log.info("Product %s: %d normal and %d defect images in this worker's mirror (%d downloaded); building into %s",
             code, len(ok.files), len(defects.files), ok.downloaded + defects.downloaded, workspace / "bank")
    task.env = script_environment({
        **env,
        "OK_DIR": str(run.mirror_dir(code) / "ok"),
        "OUT_DIR": str(workspace / "bank"),
        "DEFECT_DIRS": ":".join(_defect_dirs(defects.files.values())),
        "PATCHCORE_LOG": str(workspace / BUILD_LOG),
        "PATCHCORE_SCRIPT": str(run.script_path),  # allowed, and present, on this worker too
        "PYTHON": sys.executable,
    })


def store_build_outputs(run: PatchcoreRun, task: Any) -> None:
    """After a successful build (the task's ``post_execute``): with the ``storage`` run store, store
    the built bank and the build log for ``approve``, ``publish`` and ``register``, then remove the
    local scratch. A failure here fails the build task (it is retried)."""
    env = task.env or {}
    store = run.product_store(env["PRODUCT_CODE"])
    if store.backend == "local":
        return
    store.put_file(BUILD_LOG, env["PATCHCORE_LOG"])
    store.put_dir(BANK_DIR, env["OUT_DIR"])
    _remove_build_dir(run, env["PRODUCT_CODE"])


def store_failed_build_log(run: PatchcoreRun, task: Any) -> None:
    """When a build try fails (the task's retry and failure callbacks): with the ``storage`` run store,
    store its log so the run's record names the script's error. Never raises."""
    env = task.env or {}
    try:
        store = run.product_store(env["PRODUCT_CODE"])
        if store.backend == "local":
            return
        if env.get("PATCHCORE_LOG") and Path(env["PATCHCORE_LOG"]).is_file():
            store.put_file(BUILD_LOG, env["PATCHCORE_LOG"])
        _remove_build_dir(run, env["PRODUCT_CODE"])
    except Exception as exc:  # a callback must not hide the build's own failure
        log.warning("Could not store the build log of %s: %s: %s", env.get("PRODUCT_CODE"), type(exc).__name__, exc)


def _remove_build_dir(run: PatchcoreRun, code: str) -> None:
    """Remove a build's local scratch (and its run's folder once no other product's build uses it)."""
    workspace = run.build_dir(code)
    shutil.rmtree(workspace, ignore_errors=True)
    try:
        workspace.parent.rmdir()
    except OSError:  # another product of the run builds here, or it is gone already
        pass


def read_build_log(run: PatchcoreRun, code: str) -> str:
    """The product's build log (``""`` if the build did not run or left none)."""
    try:
        return run.product_store(code).read_text(BUILD_LOG)
    except RunFileMissing:
        return ""


def parse_build_summary(text: str | None) -> dict[str, Any] | None:
    """The builder's last ``PATCHCORE_SUMMARY {json}`` line, if any."""
    for line in reversed((text or "").splitlines()):
        if line.startswith(SUMMARY_MARK):
            try:
                return json.loads(line[len(SUMMARY_MARK):])
            except ValueError:
                return None
    return None


def publish_product(run: PatchcoreRun, product: dict[str, Any]) -> dict[str, Any]:
    """Validate the staged bank against what was asked, add ``ok/``, publish it atomically."""
    from inspection_refresh.patchcore.bank import validate_bank

    code = product["product_code"]
    store = run.product_store(code)
    with record_stage(store, "publish") as stage:
        prepared = store.read_json("stage-download.json")["facts"]
        # Not approved: NothingToDo (the task is skipped); register discards the staged bank.
        approval.require_approved(run.store, f"the bank of {code}")
        # local: the staging directory the build wrote into; storage: a new one on this worker.
        staging = Path(prepared["staging"]) if store.backend == "local" else run.publisher.stage(code)
        try:
            if store.backend == "storage":
                store.get_dir(BANK_DIR, staging)
                _materialise(run, code, "ok")
            facts = validate_bank(staging, run.expected_config())
            copy_tree_linked(run.mirror_dir(code) / "ok", staging / "ok", ignore=shutil.ignore_patterns(SYNC_STATE_FILE))
            refuse_publishing_if_run_ended(run.dag_id, run.run_id, f"the bank of {code}")
            # A manual run replaces a rollback's pin; a scheduled one never publishes over it.
            release = run.publisher.publish(code, staging, unpin=not run.scheduled)
        except BaseException:
            run.publisher.discard(staging)
            raise
        summary = parse_build_summary(read_build_log(run, code)) or {}
        stage.facts = {**summary, **facts, "version": release.version, "path": str(run.publisher.live_path(code))}
        log.info("Product %s: bank version %s published at %s", code, release.version, stage.facts["path"])
        return stage.facts


def _bank_numbers(bank_dir: Path | RunStore) -> dict[str, Any] | None:
    """Images, bank size, AUROC and tau of a bank directory (live or staged), or of the bank a build
    stored (a run store's folder), from its JSON files."""
    from inspection_refresh.patchcore.bank import CONFIG_FILE, TAU_FILE

    try:
        if isinstance(bank_dir, RunStore):
            config, tau = bank_dir.read_json(CONFIG_FILE), bank_dir.read_json(TAU_FILE)
        else:
            config, tau = read_json(bank_dir / CONFIG_FILE), read_json(bank_dir / TAU_FILE)
    except (OSError, ValueError):  # RunFileMissing is an OSError
        return None
    images = config.get("num_images")
    if images is None and isinstance(bank_dir, Path) and (bank_dir / "ok").is_dir():
        images = sum(1 for p in (bank_dir / "ok").iterdir() if p.is_file())
    return {"images": images, "bank_size": config.get("bank_size"), "feature_dim": config.get("feature_dim"),
            "auroc": (config.get("calibration") or {}).get("auroc"), "tau": tau}


def _awaiting_publish(run: PatchcoreRun, product: dict[str, Any]) -> tuple[str, str | None]:
    """Where a product stands once its build ended: ``("built", None)`` with a bank staged,
    ``("unchanged", version)``, or ``("failed", "<stage>: <reason>")``."""
    code = product["product_code"]
    record = _stage_record(run, code, "download")
    if record is None:
        return "failed", "download: the prepare task did not run"
    if record["status"] == "skipped":
        return "unchanged", record["facts"].get("unchanged")
    if record["status"] != "ok":
        return "failed", f"download: {record['message']}"
    log_text = read_build_log(run, code)
    summary = parse_build_summary(log_text) or {}
    if summary.get("status") == "completed" and _built_bank(run, code, record) is not None:
        return "built", None
    error = (summary.get("error") or _last_error_line(log_text)) if log_text else "the build task did not finish"
    return "failed", f"build: {error}"


def _stage_record(run: PatchcoreRun, code: str, stage: str) -> dict[str, Any] | None:
    """A product's stage record, or ``None`` if that stage left none."""
    try:
        return run.product_store(code).read_json(f"stage-{stage}.json")
    except RunFileMissing:
        return None


def _built_bank(run: PatchcoreRun, code: str, prepared: dict[str, Any]) -> Path | RunStore | None:
    """Where the product's built bank is before publishing: the staging directory (``local``) or the
    run store's folder (``storage``); ``None`` when no complete bank is there."""
    store = run.product_store(code)
    if store.backend == "storage":
        return store.within(BANK_DIR) if store.exists(BANK_DIR) else None
    staging = Path(prepared["facts"].get("staging", ""))
    return staging if (staging / "bank_config.json").is_file() else None


def _change(before: dict[str, Any] | None, after: dict[str, Any] | None, key: str, digits: int) -> str:
    """``live → new`` of one number of :func:`_bank_numbers` (``tau.image``: a key of ``tau``)."""
    def value(numbers: dict[str, Any] | None) -> str:
        found: Any = numbers or {}
        for part in key.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        return "none" if found is None else f"{found:.{digits}f}" if isinstance(found, float) else str(found)
    return f"{value(before)} → {value(after)}" if before else value(after)


def approval_request(run: PatchcoreRun) -> approval.ApprovalRequest | None:
    """What the approver sees before the products publish: per product to publish, images, bank
    size, AUROC and tau of the live bank and of the new one; the products that failed (they keep
    their bank whatever the answer), unchanged and pinned ones. ``None`` when no bank was built."""
    try:
        listed = run.store.read_json("products.json")
    except RunFileMissing:
        return None
    built, unchanged, failed = {}, {}, {}
    for product in listed["products"]:
        code = product["product_code"]
        state, detail = _awaiting_publish(run, product)
        if state == "unchanged":
            unchanged[code] = detail
        elif state == "failed":
            failed[code] = detail
        else:
            bank = _built_bank(run, code, _stage_record(run, code, "download"))
            live_version = run.publisher.current(code)
            built[code] = {"live_version": live_version,
                           "before": _bank_numbers(run.publisher.live_path(code)) if live_version else None,
                           "after": _bank_numbers(bank)}
    if not built:
        return None
    rows = [[code, numbers["live_version"] or "none",
             *(_change(numbers["before"], numbers["after"], key, digits)
               for key, digits in (("images", 0), ("bank_size", 0), ("auroc", 3), ("tau.image", 4), ("tau.pixel", 4)))]
            for code, numbers in built.items()]
    lines = [
        f"**{run.dag_id}** would publish a new PatchCore bank for {len(built)} product(s): {', '.join(built)}. "
        "Values are live → new (held-out AUROC; tau as in `tau.json`).",
        "",
        approval.markdown_table(["Product", "Live version", "Images", "Bank size", "AUROC", "tau image",
                                 "tau pixel"], rows),
    ]
    if failed:
        lines += ["", f"**Failed ({len(failed)})** — not published whatever the answer; each keeps its live bank:"]
        lines += [f"- {code} at {detail}" for code, detail in failed.items()]
    if unchanged:
        lines += ["", "Unchanged (nothing to publish): " + ", ".join(f"{c} (version {v})" for c, v in unchanged.items())]
    if listed.get("pinned"):
        lines += ["", "Left out (pinned): " + ", ".join(listed["pinned"])]
    if run.weights == "random":
        lines += ["", "⚠ Built with RANDOM backbone weights (demo/test only)."]
    lines += ["", "**Approve** publishes every bank in the table. **Reject** publishes none: each product keeps "
                  "its live bank and the new banks are discarded."]
    summary = {"products": built, "failed": failed, "unchanged": unchanged, "pinned": sorted(listed.get("pinned", {})),
               "settings": {"coreset": run.coreset, "shorter": run.shorter, "stride": run.stride,
                            "layers": list(run.layers), "weights": run.weights}}
    subject = (f"Publish PatchCore banks of {', '.join(built)}"
               + (f" ({len(failed)} other product(s) failed)" if failed else ""))
    return approval.ApprovalRequest(subject=subject, body="\n".join(lines), summary=summary)


def _product_outcome(run: PatchcoreRun, product: dict[str, Any]) -> dict[str, Any]:
    code = product["product_code"]
    records = {stage: _stage_record(run, code, stage) for stage in ("download", "publish")}
    log_text = read_build_log(run, code)
    summary = parse_build_summary(log_text) or {}
    outcome: dict[str, Any] = {"product_id": product["product_id"]}
    if records["publish"] and records["publish"]["status"] == "ok":
        facts = records["publish"]["facts"]
        outcome.update(status="published", **{k: facts.get(k) for k in (
            "num_images", "bank_size", "feature_dim", "tau", "seconds", "auroc", "accuracy_at_tau", "version",
            "path")})
        return outcome
    if records["download"] and records["download"]["status"] == "skipped":
        facts = records["download"]["facts"]
        return {**outcome, "status": "unchanged", "version": facts.get("unchanged"), "num_images": facts.get("images")}
    if not records["download"] or records["download"]["status"] != "ok":
        reason = records["download"]["message"] if records["download"] else "download did not run"
        return {**outcome, "status": "failed", "stage": "download", "error": reason}
    blocked = approval.blocked_message(approval.read_decision(run.store))
    built = summary.get("status") == "completed"
    if blocked and built and (not records["publish"] or records["publish"]["status"] == "skipped"):
        return {**outcome, "status": "failed", "stage": "approve", "error": blocked, "not_approved": True,
                **{k: summary.get(k) for k in ("bank_size", "feature_dim", "tau", "auroc")}}
    if records["publish"]:
        return {**outcome, "status": "failed", "stage": "validate/publish", "error": records["publish"]["message"]}
    if summary.get("status") == "ok" or not log_text:
        error = "the build task did not finish (see its log)"
    else:
        error = summary.get("error") or _last_error_line(log_text)
    return {**outcome, "status": "failed", "stage": "build", "error": error}


def _discard_staging(run: PatchcoreRun, code: str) -> None:
    """A failed product's staging directory is never published; remove it now (``local``: with the
    ``storage`` run store nothing is staged before publish, which discards its own on failure)."""
    record = _stage_record(run, code, "download")
    staging = record["facts"].get("staging") if record else None
    if staging and Path(staging).exists():
        run.publisher.discard(staging)


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower():
            return line[-500:]
    return lines[-1][-500:] if lines else "the build script failed without output"


def _read_or_none(store: RunStore, name: str) -> Any:
    try:
        return store.read_json(name)
    except RunFileMissing:
        return None


def register(run: PatchcoreRun) -> dict[str, Any]:
    """Write the run's one ``patchcore_create`` row with per-product results; return the outcome.

    A cleared register whose run already closed its row and removed its work files (a
    completed run) returns what the row says instead of rewriting it as failed.
    """
    store = run.store
    listed = _read_or_none(store, "products.json")
    work_files_gone = listed is None and not store.exists("stage-list_products.json")
    if work_files_gone and _db_configured(run.settings.db_conn_id):
        recorded = recorded_outcome(DeploymentRegistry(run.settings.db_conn_id), run.dag_id, run.run_id)
        if recorded:
            return recorded
    listed = listed if listed is not None else {"products": [], "history": True}
    results = {p["product_code"]: _product_outcome(run, p) for p in listed["products"]}
    pinned = listed.get("pinned", {})
    failed = {code: r for code, r in results.items() if r["status"] not in ("published", "unchanged")}
    for code in failed:
        _discard_staging(run, code)
    published = [code for code, r in results.items() if r["status"] == "published"]
    if not results and not pinned:
        stage_record = _read_or_none(store, "stage-list_products.json")
        reason = stage_record["message"] if stage_record else "see the list_products task log"
        status, text = "failed", f"no products were built: {reason}"
    elif failed:
        status = "failed"
        not_approved = [code for code, r in failed.items() if r.get("not_approved")]
        others = {code: r for code, r in failed.items() if code not in not_approved}
        parts = []
        if not_approved:
            parts.append(f"Not published ({failed[not_approved[0]]['error']}): {', '.join(not_approved)} "
                         f"keep{'s' if len(not_approved) == 1 else ''} the live bank; the new "
                         f"bank{'s were' if len(not_approved) > 1 else ' was'} discarded")
        if others:
            parts.append(f"{len(others)} of {len(results)} products failed: "
                         + "; ".join(f"{code} at {r['stage']}: {r['error']}" for code, r in others.items()))
        text = (". ".join(parts)
                + (f". Published: {', '.join(published)}." if published else ". Nothing was published.")
                + " Failed products keep their previous bank.")
    else:
        status = "completed"
        parts = [f"{len(published)} PatchCore banks published: " + ", ".join(
            f"{code} ({results[code]['bank_size']}x{results[code]['feature_dim']})" for code in published)
        ] if published else []
        parts += [f"{code} unchanged, version {r['version']} stays live"
                  for code, r in results.items() if r["status"] == "unchanged"]
        text = "; ".join(parts) or "No bank was built"
    if pinned:
        text += ". Left out (pinned): " + "; ".join(f"{code} {describe_pin(pin)}" for code, pin in pinned.items())
    if run.weights == "random":
        text += " — RANDOM backbone weights (demo/test only)"
    result_data = {"products": results, "pinned": pinned,
                   "approval": approval.decision_facts(approval.read_decision(store)), "settings": {
        "coreset": run.coreset, "shorter": run.shorter, "stride": run.stride, "layers": list(run.layers),
        "weights": run.weights, "script": str(run.script or BUNDLED_SCRIPT)}}
    deploy_id = None
    if listed.get("history", True):
        deploy_id = DeploymentRegistry(run.settings.db_conn_id).finish(
            DEPLOY_TYPE, run.dag_id, run.run_id, status=status, message=text, result_data=result_data,
            deployed_by=run.deployed_by)
    else:
        log.warning("No deployment_logs row: connection %r is not configured", run.settings.db_conn_id)
    log.info("PatchCore run %s: %s", status, text)
    if status == "completed":
        store.remove_run()
    return {"deploy_id": deploy_id, "status": status, "message": text, "products": results}
