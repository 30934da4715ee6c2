"""The PatchCore pipeline as plain functions, one per Airflow task of ``patchcore_memory_bank``.

``list_products`` -> per product: ``prepare_product`` (download) -> build (``build_patchcore.sh``
via BashOperator) -> one ``approve`` step for the whole run (``airflow_support.PublishApproval``,
showing :func:`approval_request`; passes at once unless the run requires approval) -> per product:
``publish_product`` (validate + atomic publish) -> ``register``.

Every product has its own stage records, so one product's failure never stops
the others from publishing, and the history row names what failed and why.
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
from pathlib import Path
from typing import Any

from inspection_refresh.airflow_support import PermanentError, finished_run_state, refuse_publishing_if_run_ended
from inspection_refresh.config import Settings, get_settings
from inspection_refresh.files import copy_tree_linked
from inspection_refresh.images import DEFECT_PREFIX, NORMAL_PREFIX, reject_reason
from inspection_refresh.patchcore.options import LAYER_CHANNELS, BuildOptions
from inspection_refresh.publish import Publisher, PublishError, check_name, describe_pin
from inspection_refresh.registry import DeploymentRegistry, Product, RegistryError
from inspection_refresh.storage import SYNC_STATE_FILE, ObjectStorage, require_complete
from inspection_refresh.tasks.common import (
    NothingToDo, cap_list, prune_run_work_dirs, read_json, recorded_outcome, remove_run_work_dir, run_work_dir,
    unpin_hint, write_json,
)
from inspection_refresh.tasks import approval
from inspection_refresh.tasks.stages import record_stage

log = logging.getLogger(__name__)

DEPLOY_TYPE = "patchcore_create"
PIPELINE = "patchcore"
BUNDLED_SCRIPT = Path(__file__).resolve().parents[1] / "build_patchcore.sh"
SUMMARY_MARK = "PATCHCORE_SUMMARY "  # the builder's last stdout line, kept in the build log
LAYERS = tuple(LAYER_CHANNELS)
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
        return run_work_dir(self.settings.cache_root, PIPELINE, self.run_id)

    def product_dir(self, code: str) -> Path:
        path = self.work_dir / check_name(code)
        path.mkdir(parents=True, exist_ok=True)
        return path

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
    prune_run_work_dirs(run.settings.cache_root, PIPELINE)
    shutil.rmtree(run.work_dir, ignore_errors=True)  # a cleared-and-rerun run starts clean
    run.work_dir.mkdir(parents=True, exist_ok=True)
    with record_stage(run.work_dir, "list_products"):
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
    write_json(run.work_dir / "products.json",
               {"source": source, "products": chosen, "pinned": pinned, "history": use_db})
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
    with record_stage(run.product_dir(code), "download") as stage:
        if product.get("problem"):
            raise PermanentError(product["problem"])
        storage = ObjectStorage(run.settings.storage_conn_id, max_transfers=run.settings.patchcore_transfers)
        cache = run.settings.cache_root / PIPELINE / code
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
        defect_dirs = sorted({str(path.parent) for path in defects.files.values()})
        staging = run.publisher.stage(code)
        stage.facts = {"images": len(normal.files), "defect_images": len(defects.files),
                       "skipped": cap_list([list(s) for s in normal.skipped]), "num_skipped": len(normal.skipped),
                       "staging": str(staging)}
        log.info("Product %s: %d normal images (%d downloaded, %d unchanged), %d labelled defect images",
                 code, len(normal.files), normal.downloaded, normal.unchanged, len(defects.files))
        return script_environment({
            "PRODUCT_CODE": code,
            "OK_DIR": str(cache / "ok"),
            "OUT_DIR": str(staging),
            "DEFECT_DIRS": ":".join(defect_dirs),
            "PATCHCORE_SHORTER": str(run.shorter),
            "PATCHCORE_STRIDE": str(run.stride),
            "PATCHCORE_LAYERS": ",".join(run.layers),
            "PATCHCORE_CORESET": str(run.coreset),
            "PATCHCORE_WEIGHTS": run.weights,
            "PATCHCORE_DEVICE": run.device,
            "PATCHCORE_SCRIPT": str(run.script_path),
            "PATCHCORE_LOG": str(run.product_dir(code) / "build.log"),
            "PYTHON": sys.executable,
        })


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
    with record_stage(run.product_dir(code), "publish") as stage:
        staging = Path(read_json(run.product_dir(code) / "stage-download.json")["facts"]["staging"])
        # Not approved: NothingToDo (the task is skipped); register discards the staged bank.
        approval.require_approved(run.work_dir, f"the bank of {code}")
        try:
            facts = validate_bank(staging, run.expected_config())
            copy_tree_linked(run.settings.cache_root / PIPELINE / code / "ok", staging / "ok",
                             ignore=shutil.ignore_patterns(SYNC_STATE_FILE))
            refuse_publishing_if_run_ended(run.dag_id, run.run_id, f"the bank of {code}")
            # A manual run replaces a rollback's pin; a scheduled one never publishes over it.
            release = run.publisher.publish(code, staging, unpin=not run.scheduled)
        except BaseException:
            run.publisher.discard(staging)
            raise
        build_log = run.product_dir(code) / "build.log"
        summary = parse_build_summary(build_log.read_text(errors="replace") if build_log.exists() else None) or {}
        stage.facts = {**summary, **facts, "version": release.version, "path": str(run.publisher.live_path(code))}
        log.info("Product %s: bank version %s published at %s", code, release.version, stage.facts["path"])
        return stage.facts


def _bank_numbers(bank_dir: Path) -> dict[str, Any] | None:
    """Images, bank size, AUROC and tau of a bank directory (live or staged), from its JSON files."""
    from inspection_refresh.patchcore.bank import CONFIG_FILE, TAU_FILE

    try:
        config = read_json(bank_dir / CONFIG_FILE)
        tau = read_json(bank_dir / TAU_FILE)
    except (OSError, ValueError):
        return None
    images = config.get("num_images")
    if images is None and (bank_dir / "ok").is_dir():
        images = sum(1 for p in (bank_dir / "ok").iterdir() if p.is_file())
    return {"images": images, "bank_size": config.get("bank_size"), "feature_dim": config.get("feature_dim"),
            "auroc": (config.get("calibration") or {}).get("auroc"), "tau": tau}


def _awaiting_publish(run: PatchcoreRun, product: dict[str, Any]) -> tuple[str, str | None]:
    """Where a product stands once its build ended: ``("built", None)`` with a bank staged,
    ``("unchanged", version)``, or ``("failed", "<stage>: <reason>")``."""
    directory = run.product_dir(product["product_code"])
    path = directory / "stage-download.json"
    record = read_json(path) if path.exists() else None
    if record is None:
        return "failed", "download: the prepare task did not run"
    if record["status"] == "skipped":
        return "unchanged", record["facts"].get("unchanged")
    if record["status"] != "ok":
        return "failed", f"download: {record['message']}"
    build_log = directory / "build.log"
    log_text = build_log.read_text(errors="replace") if build_log.exists() else ""
    summary = parse_build_summary(log_text) or {}
    staging = Path(record["facts"].get("staging", ""))
    if summary.get("status") == "completed" and (staging / "bank_config.json").is_file():
        return "built", None
    error = (summary.get("error") or _last_error_line(log_text)) if log_text else "the build task did not finish"
    return "failed", f"build: {error}"


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
    listed_path = run.work_dir / "products.json"
    if not listed_path.exists():
        return None
    listed = read_json(listed_path)
    built, unchanged, failed = {}, {}, {}
    for product in listed["products"]:
        code = product["product_code"]
        state, detail = _awaiting_publish(run, product)
        if state == "unchanged":
            unchanged[code] = detail
        elif state == "failed":
            failed[code] = detail
        else:
            staging = Path(read_json(run.product_dir(code) / "stage-download.json")["facts"]["staging"])
            live_version = run.publisher.current(code)
            built[code] = {"live_version": live_version,
                           "before": _bank_numbers(run.publisher.live_path(code)) if live_version else None,
                           "after": _bank_numbers(staging)}
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
    directory = run.product_dir(product["product_code"])
    records = {}
    for stage in ("download", "publish"):
        path = directory / f"stage-{stage}.json"
        records[stage] = read_json(path) if path.exists() else None
    build_log = directory / "build.log"
    log_text = build_log.read_text(errors="replace") if build_log.exists() else ""
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
    blocked = approval.blocked_message(approval.read_decision(run.work_dir))
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
    """A failed product's staging directory is never published; remove it now."""
    record = run.product_dir(code) / "stage-download.json"
    staging = read_json(record)["facts"].get("staging") if record.exists() else None
    if staging and Path(staging).exists():
        run.publisher.discard(staging)


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower():
            return line[-500:]
    return lines[-1][-500:] if lines else "the build script failed without output"


def register(run: PatchcoreRun) -> dict[str, Any]:
    """Write the run's one ``patchcore_create`` row with per-product results; return the outcome.

    A cleared register whose run already closed its row and removed its work files (a
    completed run) returns what the row says instead of rewriting it as failed.
    """
    listed_path = run.work_dir / "products.json"
    work_files_gone = not listed_path.exists() and not (run.work_dir / "stage-list_products.json").exists()
    if work_files_gone and _db_configured(run.settings.db_conn_id):
        recorded = recorded_outcome(DeploymentRegistry(run.settings.db_conn_id), run.dag_id, run.run_id)
        if recorded:
            return recorded
    listed = read_json(listed_path) if listed_path.exists() else {"products": [], "history": True}
    results = {p["product_code"]: _product_outcome(run, p) for p in listed["products"]}
    pinned = listed.get("pinned", {})
    failed = {code: r for code, r in results.items() if r["status"] not in ("published", "unchanged")}
    for code in failed:
        _discard_staging(run, code)
    published = [code for code, r in results.items() if r["status"] == "published"]
    if not results and not pinned:
        stage_path = run.work_dir / "stage-list_products.json"
        reason = read_json(stage_path)["message"] if stage_path.exists() else "see the list_products task log"
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
                   "approval": approval.decision_facts(approval.read_decision(run.work_dir)), "settings": {
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
        remove_run_work_dir(run.settings.cache_root, PIPELINE, run.run_id)
    return {"deploy_id": deploy_id, "status": status, "message": text, "products": results}
