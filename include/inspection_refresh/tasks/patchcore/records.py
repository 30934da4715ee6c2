"""The PatchCore run's closing step: ``register`` writes the run's one ``deployment_logs`` row, with
each product's outcome read back from its stage records and build log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from inspection_refresh import compose
from inspection_refresh.progress import counted
from inspection_refresh.publish import describe_pin
from inspection_refresh.tasks import approval, gating
from inspection_refresh.tasks.common import cap_list, live_version, lost_race, recorded_outcome
from inspection_refresh.tasks.patchcore.build import last_error_line, parse_build_summary, read_build_log
from inspection_refresh.tasks.patchcore.publishing import bank_version
from inspection_refresh.tasks.patchcore.run import (
    BUNDLED_SCRIPT, DEPLOY_TYPE, PatchcoreRun, db_configured, read_or_none, stage_record,
)

log = logging.getLogger(__package__)  # the pipeline's one logger, named as before it was split


def _product_outcome(run: PatchcoreRun, product: dict[str, Any]) -> dict[str, Any]:
    code = product["product_code"]
    records = {stage: stage_record(run, code, stage) for stage in ("download", "publish")}
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
    built = summary.get("status") == "completed"
    gate_blocked = gating.blocked_reason(run.store, code)
    if gate_blocked and built and (not records["publish"] or records["publish"]["status"] == "skipped"):
        return {**outcome, "status": "failed", "stage": "quality_gate", "error": gate_blocked, "gate_blocked": True,
                **{k: summary.get(k) for k in ("bank_size", "feature_dim", "tau", "auroc")}}
    blocked = approval.blocked_message(approval.read_decision(run.store))
    if blocked and built and (not records["publish"] or records["publish"]["status"] == "skipped"):
        return {**outcome, "status": "failed", "stage": "approve", "error": blocked, "not_approved": True,
                **{k: summary.get(k) for k in ("bank_size", "feature_dim", "tau", "auroc")}}
    planned = bank_version(run.product_store(code))
    if (records["publish"] and records["publish"]["status"] == "failed" and planned
            and live_version(run.publisher, code) == planned):  # it went live, then the task failed
        return {**outcome, "status": "published", "version": planned, "path": str(run.publisher.live_path(code)),
                **{k: summary.get(k) for k in ("bank_size", "feature_dim", "tau", "auroc")},
                "failed_after_swap": records["publish"]["message"]}
    lost = lost_race(records["publish"]["message"]) if records["publish"] else None
    if records["publish"] and records["publish"]["status"] == "failed" and lost:  # a rollback won: nothing to retry
        return {**outcome, "status": "failed", "stage": "publish", "error": lost}
    if records["publish"] and records["publish"]["status"] == "failed":  # the built bank stays for a retry
        return {**outcome, "status": "failed", "stage": "validate/publish", "bank_kept": True,
                "error": f"{records['publish']['message']} (the built bank is kept: clearing publish retries "
                         "publishing it without a rebuild)"}
    if records["publish"]:
        return {**outcome, "status": "failed", "stage": "validate/publish", "error": records["publish"]["message"]}
    if summary.get("status") == "ok" or not log_text:
        error = "the build task did not finish (see its log)"
    else:
        error = summary.get("error") or last_error_line(log_text)
    return {**outcome, "status": "failed", "stage": "build", "error": error}


def _suspects(summary: dict[str, Any]) -> dict[str, Any]:
    """The build's suspected defects (normal images above tau out of sample) for a product's result."""
    if "suspected_defects" not in summary:
        return {}
    suspects = summary.get("suspected_defects") or []
    return {"suspected_defects": cap_list(suspects, 20), "num_suspected_defects": len(suspects)}


def _discard_staging(run: PatchcoreRun, code: str) -> None:
    """A failed product's staging directory is never published; remove it now (``local``: with the
    ``storage`` run store nothing is staged before publish, which discards its own on failure). Not
    called for a failed publish: its built bank is kept for a cleared ``publish`` (the next run's
    ``prepare`` of the product removes it)."""
    record = stage_record(run, code, "download")
    staging = record["facts"].get("staging") if record else None
    if staging and Path(staging).exists():
        run.publisher.discard(staging)


def register(run: PatchcoreRun) -> dict[str, Any]:
    """Write the run's one ``patchcore_create`` row with per-product results; return the outcome.

    A cleared register whose run already closed its row and removed its work files (a
    completed run) returns what the row says instead of rewriting it as failed.
    """
    store = run.store
    listed = read_or_none(store, "products.json")
    work_files_gone = listed is None and not store.exists("stage-list_products.json")
    if work_files_gone and db_configured(run.settings.db_conn_id):
        recorded = recorded_outcome(compose.deployment_registry(run.settings.db_conn_id), run.dag_id, run.run_id)
        if recorded:
            return recorded
    listed = listed if listed is not None else {"products": [], "history": True}
    results = {p["product_code"]: _product_outcome(run, p) for p in listed["products"]}
    for code, result in results.items():  # what the build flagged, whatever the outcome
        result.update(_suspects(parse_build_summary(read_build_log(run, code)) or {}))
    pinned = listed.get("pinned", {})
    failed = {code: r for code, r in results.items() if r["status"] not in ("published", "unchanged")}
    for code in (code for code, r in failed.items() if not r.get("bank_kept")):
        _discard_staging(run, code)
    published = [code for code, r in results.items() if r["status"] == "published"]
    if not results and not pinned:
        stage_record = read_or_none(store, "stage-list_products.json")
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
        unchanged = [code for code, r in results.items() if r["status"] == "unchanged"]
        parts = [f"{counted(len(published), 'PatchCore bank')} published: " + ", ".join(
            f"{code} ({results[code]['bank_size']}x{results[code]['feature_dim']})" for code in published)
        ] if published else [f"{counted(len(unchanged), 'product')} unchanged, nothing published"] if unchanged else []
        parts += [f"{code} unchanged, version {results[code]['version']} stays live" for code in unchanged]
        text = "; ".join(parts) or "No bank was built"
    if pinned:
        text += ". Left out (pinned): " + "; ".join(f"{code} {describe_pin(pin)}" for code, pin in pinned.items())
    text = gating.with_note(text, gating.flagged_note(
        store, [code for code, r in results.items() if not r.get("gate_blocked")]))
    if run.weights == "random" and any(r["status"] == "published" or r.get("not_approved") or r.get("bank_kept")
                                       or r.get("gate_blocked") for r in results.values()):
        text += " — RANDOM backbone weights (demo/test only)"  # about banks that were built, not the settings
    result_data = {"products": results, "pinned": pinned, "quality_gate": gating.gate_facts(store),
                   "approval": approval.decision_facts(approval.read_decision(store)), "settings": {
        "coreset": run.coreset, "shorter": run.shorter, "stride": run.stride, "layers": list(run.layers),
        "weights": run.weights, "script": str(run.script or BUNDLED_SCRIPT)}}
    deploy_id = None
    if listed.get("history", True):
        deploy_id = compose.deployment_registry(run.settings.db_conn_id).finish(
            DEPLOY_TYPE, run.dag_id, run.run_id, status=status, message=text, result_data=result_data,
            deployed_by=run.deployed_by)
    else:
        log.warning("No deployment_logs row: connection %r is not configured", run.settings.db_conn_id)
    log.info("PatchCore run %s: %s", status, text)
    if status == "completed":
        store.remove_run()
    return {"deploy_id": deploy_id, "status": status, "message": text, "products": results}
