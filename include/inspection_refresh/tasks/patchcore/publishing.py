"""The PatchCore run's publishing side: what the approver sees (live bank against the built one) and
``publish_product`` (validate the built bank, add ``ok/``, publish it atomically)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from inspection_refresh import quality_gate
from inspection_refresh.files import copy_tree_linked, tree_files
from inspection_refresh.progress import counted
from inspection_refresh.publish import new_version_id
from inspection_refresh.runstore import RunFileMissing, RunStore
from inspection_refresh.runtime import refuse_publishing_if_run_ended
from inspection_refresh.storage import SYNC_STATE_FILE
from inspection_refresh.tasks import approval, gating
from inspection_refresh.tasks.common import read_json
from inspection_refresh.tasks.patchcore.build import last_error_line, materialise, parse_build_summary, read_build_log
from inspection_refresh.tasks.patchcore.run import BANK_DIR, INVENTORY, PatchcoreRun, stage_record
from inspection_refresh.tasks.stages import record_stage

log = logging.getLogger(__package__)  # the pipeline's one logger, named as before it was split

BANK_VERSION = "bank-version.json"
"""In a product's run store: the version its first publish try chose, so that every try names the same one."""


def bank_version(store: RunStore, *, choose: bool = False) -> str | None:
    """The version this run publishes the product's bank as (``choose``: chosen now if no try chose one)."""
    try:
        return str(store.read_json(BANK_VERSION)["version"])
    except RunFileMissing:
        if not choose:
            return None
    version = new_version_id()
    store.write_json(BANK_VERSION, {"version": version})
    return version


PUBLISH_ADDS = ("ok",)
"""What ``publish`` adds to a built bank (its normal images, from the mirror): named apart in an approval."""


def publish_product(run: PatchcoreRun, product: dict[str, Any]) -> dict[str, Any]:
    """Validate the built bank against what was asked, add ``ok/``, publish it atomically.

    The bank comes from the run store (:meth:`RunStore.fetch_dir`): the staging directory the build
    wrote into (``local``), or a new one on this worker filled from the store (``storage``). A failed
    publish keeps the built bank (``local``: its staging directory, which ``register`` leaves too;
    ``storage``: the store's copy), so clearing ``publish`` retries the publish, not the build. When a
    person approved the run, the bank must be the one they approved (:func:`bank_target`).
    """
    from inspection_refresh.patchcore.bank import validate_bank

    code = product["product_code"]
    store = run.product_store(code)
    with record_stage(store, "publish") as stage:
        prepared = store.read_json("stage-download.json")["facts"]
        # Not approved: NothingToDo (the task is skipped); register discards the staged bank.
        approval.require_approved(run.store, f"the bank of {code}")
        gating.require_not_blocked(run.store, code, f"the bank of {code}")
        version = bank_version(store, choose=True)
        release = run.publisher.published(code, version)  # a retry of a try that went live, then failed
        if release is not None:
            facts = validate_bank(release.path, run.expected_config())
        else:
            with store.fetch_dir(BANK_DIR, prepared, lambda: run.publisher.stage(code),
                                 refill=lambda _: materialise(run, code, "ok"), discard=run.publisher.discard,
                                 keep_in_place=True) as staging:
                approval.require_as_approved(run.store, code, f"the bank of {code}",
                                             lambda: bank_target(run, code, tree_files(staging, skip=PUBLISH_ADDS)))
                facts = validate_bank(staging, run.expected_config())
                shutil.rmtree(staging / "ok", ignore_errors=True)  # what a failed try added; the mirror's now
                copy_tree_linked(run.mirror_dir(code) / "ok", staging / "ok",
                                 ignore=shutil.ignore_patterns(SYNC_STATE_FILE))
                refuse_publishing_if_run_ended(run.dag_id, run.run_id, f"the bank of {code}")
                # A manual run replaces a rollback's pin; a scheduled one never publishes over it.
                release = run.publisher.publish(code, staging, version, unpin=not run.scheduled)
        summary = parse_build_summary(read_build_log(run, code)) or {}
        stage.facts = {**summary, **facts, "version": release.version, "path": str(run.publisher.live_path(code))}
        log.info("Product %s: bank version %s published at %s", code, release.version, stage.facts["path"])
        return stage.facts


def bank_target(run: PatchcoreRun, code: str, files: dict[str, tuple[int, str]]) -> dict[str, Any]:
    """What an approval of ``code``'s built bank names (:func:`approval.target`): the sha256 of the bank's
    files and, as ``ok_images``, of the normal images ``prepare`` recorded (key, ETag, size), which publish
    adds as ``ok/``. No version: a bank gets it when published."""
    images = run.product_store(code).read_json(INVENTORY)["ok"]["images"]
    listed = json.dumps(sorted((i["key"], i["etag"], i["size"]) for i in images)).encode()
    return approval.target(None, files, ok_images=hashlib.sha256(listed).hexdigest())


def _bank_numbers(bank_dir: Path | RunStore) -> dict[str, Any] | None:
    """Images, bank size, AUROC and tau of a live bank's directory, or of a built bank (a store over
    it, :func:`_built_bank`), from its JSON files."""
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
    record = stage_record(run, code, "download")
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
    error = (summary.get("error") or last_error_line(log_text)) if log_text else "the build task did not finish"
    return "failed", f"build: {error}"


def _built_bank(run: PatchcoreRun, code: str, prepared: dict[str, Any]) -> RunStore | None:
    """The product's built bank before publishing, to read its JSON files (:meth:`RunStore.find_dir`: its
    staging directory with ``local``, the run store's folder with ``storage``); ``None`` when no complete
    bank is there. ``prepared``: the product's download record."""
    return run.product_store(code).find_dir(BANK_DIR, prepared["facts"], done="bank_config.json")


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
    built, unchanged, failed, targets, blocked = {}, {}, {}, {}, {}
    for product in listed["products"]:
        code = product["product_code"]
        state, detail = _awaiting_publish(run, product)
        if state == "built" and gating.blocked_reason(run.store, code):
            blocked[code] = gating.blocked_reason(run.store, code)
        elif state == "unchanged":
            unchanged[code] = detail
        elif state == "failed":
            failed[code] = detail
        else:
            prepared = stage_record(run, code, "download")
            bank = _built_bank(run, code, prepared)
            live_version = run.publisher.current(code)
            built[code] = {"live_version": live_version,
                           "before": _bank_numbers(run.publisher.live_path(code)) if live_version else None,
                           "after": _bank_numbers(bank)}
            targets[code] = bank_target(run, code, run.product_store(code).kept_files(
                BANK_DIR, prepared["facts"], skip=PUBLISH_ADDS))
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
    if blocked:
        lines += ["", f"**Blocked by the quality gate ({len(blocked)})** — not published whatever the answer; "
                      "each keeps its live bank: " + ", ".join(blocked)]
    if unchanged:
        lines += ["", "Unchanged (nothing to publish): " + ", ".join(f"{c} (version {v})" for c, v in unchanged.items())]
    if listed.get("pinned"):
        lines += ["", "Left out (pinned): " + ", ".join(listed["pinned"])]
    if run.weights == "random":
        lines += ["", "⚠ Built with RANDOM backbone weights (demo/test only)."]
    lines += ["", "**Approve** publishes every bank in the table. **Reject** publishes none: each product keeps "
                  "its live bank and the new banks are discarded."]
    lines += ["", "Approving names each bank by the sha256 of its files ("
              + ", ".join(f"{code} `{named['sha256'][:16]}…`" for code, named in targets.items())
              + "): publish refuses any other (e.g. one rebuilt by clearing build)."]
    summary = {"products": built, "failed": failed, "blocked": blocked, "unchanged": unchanged,
               "pinned": sorted(listed.get("pinned", {})),
               "settings": {"coreset": run.coreset, "shorter": run.shorter, "stride": run.stride,
                            "layers": list(run.layers), "weights": run.weights}}
    subject = (f"Publish PatchCore banks of {', '.join(built)}"
               + (f" ({len(failed)} other product(s) failed)" if failed else ""))
    return approval.ApprovalRequest(subject=subject, body="\n".join(lines), summary=summary, targets=targets)


def _bank_quality(bank: RunStore) -> dict[str, Any] | None:
    """The builder's ``quality.json`` beside a built bank (``None`` from a builder that writes none)."""
    try:
        return bank.read_json("quality.json")
    except (OSError, ValueError):  # RunFileMissing is an OSError
        return None


def quality_check(run: PatchcoreRun, mode: str) -> quality_gate.GateDecision | None:
    """The gate's decision on every built bank (``None`` when none was built): the normal images its
    builder scored above tau out of sample, and its held-out AUROC and tau against the live bank's."""
    try:
        listed = run.store.read_json("products.json")
    except RunFileMissing:
        return None
    findings, checked = [], []
    for product in listed["products"]:
        code = product["product_code"]
        if _awaiting_publish(run, product)[0] != "built":
            continue
        bank = _built_bank(run, code, stage_record(run, code, "download"))
        checked.append(code)
        live = _bank_numbers(run.publisher.live_path(code)) if run.publisher.current(code) else None
        margins = gating.margins(run.settings)
        findings += quality_gate.suspected_defects(code, _bank_quality(bank), margins)
        findings += quality_gate.bank_regressions(code, live, _bank_numbers(bank), margins)
    return quality_gate.decide(mode, findings, checked=checked) if checked else None


def nothing_to_approve(run: PatchcoreRun) -> str | None:
    """Why the run's ``approve`` step has nothing to approve (it is then skipped, with this reason), or ``None``
    when some bank was built: the run chose no product (``list_products`` failed), or no product's build
    produced a bank (each unchanged or failed)."""
    try:
        listed = run.store.read_json("products.json")
    except RunFileMissing:
        try:
            reason = run.store.read_json("stage-list_products.json")["message"]
        except (RunFileMissing, KeyError):
            reason = ""
        return f"no product was chosen ({reason or 'list_products did not finish'})"
    states = Counter(_awaiting_publish(run, product)[0] for product in listed["products"])
    if states["built"]:
        return None
    counts = [counted(states[state], "product") + f" {state}" for state in ("unchanged", "failed") if states[state]]
    return f"no bank was built ({', '.join(counts) or 'no product to build'})"
