"""The PatchCore build task's side of the pipeline: the script's environment, the BashOperator's hooks
that fetch its inputs and keep its outputs through the run store, and reading its log back."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from inspection_refresh.progress import PROGRESS_FILE_ENV
from inspection_refresh.runstore import RunFileMissing, materialise_images
from inspection_refresh.storage import SyncResult, require_complete
from inspection_refresh.tasks.live_progress import ProgressFileRelay, run_reporter
from inspection_refresh.tasks.patchcore.run import (
    BANK_DIR, BUILD_LOG, INVENTORY, SUMMARY_MARK, PatchcoreRun, db_configured, script_environment,
)

log = logging.getLogger(__package__)  # the pipeline's one logger, named as before it was split


def build_environment(run: PatchcoreRun, contract: dict[str, str], *, out_dir: Path,
                      defect_files: Iterable[Path], log_dir: Path) -> dict[str, str]:
    """The build script's whole environment on this worker: ``prepare``'s ``contract`` plus ``OK_DIR``,
    ``OUT_DIR``, ``DEFECT_DIRS``, ``PATCHCORE_LOG`` (in ``log_dir``), ``PYTHON``, this worker's feature cache
    (``PATCHCORE_FEATURE_CACHE``/``_GB``, when its bound is not 0) and the inherited variables."""
    from inspection_refresh.patchcore.feature_cache import default_feature_cache_dir

    cache_gb = run.settings.patchcore_feature_cache_gb
    return script_environment({
        **contract,
        **({"PATCHCORE_FEATURE_CACHE": str(default_feature_cache_dir(run.settings.cache_root)),
            "PATCHCORE_FEATURE_CACHE_GB": f"{cache_gb:g}"} if cache_gb > 0 else {}),
        "OK_DIR": str(run.mirror_dir(contract["PRODUCT_CODE"]) / "ok"),
        "OUT_DIR": str(out_dir),
        "DEFECT_DIRS": ":".join(defect_dirs(defect_files)),
        "PATCHCORE_LOG": str(log_dir / BUILD_LOG),
        "PYTHON": sys.executable,
    })


def defect_dirs(paths: Iterable[Path]) -> list[str]:
    """The directories of the labelled defect images (one per defect type), for ``DEFECT_DIRS``."""
    return sorted({str(Path(path).parent) for path in paths})


def materialise(run: PatchcoreRun, code: str, part: str) -> SyncResult:
    """Bring this worker's mirror of ``part`` (``ok`` or ``defects``) of ``code`` to the run's inventory."""
    listed = run.product_store(code).read_json(INVENTORY)[part]
    result = materialise_images(run.mirror_storage(), listed["prefix"], listed["images"], run.mirror_dir(code) / part)
    require_complete(result)
    return result


def fetch_build_inputs(run: PatchcoreRun, task: Any) -> None:
    """Before the build task runs its command (its ``pre_execute``), on the build worker.

    Where the run store has the build task settle its own paths (:meth:`RunStore.settle_here`,
    ``storage``): fills this worker's mirror with the product's ``ok/`` and defect images as ``prepare``
    recorded them, creates a fresh local ``OUT_DIR`` in the build's workspace and completes the script's
    environment (:func:`build_environment`, all of this worker). It runs in the task's own process, not
    in the command: only the task process may read Airflow connections, and the script must not see
    them. With ``local`` the environment ``prepare`` returned is already complete: nothing to do.
    """
    env = dict(task.env or {})
    code = env["PRODUCT_CODE"]
    store = run.product_store(code)

    def settle() -> None:
        ok, defects = materialise(run, code, "ok"), materialise(run, code, "defects")
        workspace = store.workspace(run.build_dir(code))
        (workspace / "bank").mkdir()
        log.info("Product %s: %d normal and %d defect images in this worker's mirror (%d downloaded); building "
                 "into %s", code, len(ok.files), len(defects.files), ok.downloaded + defects.downloaded,
                 workspace / "bank")
        contract = {**env, "PATCHCORE_SCRIPT": str(run.script_path)}  # allowed, and present, on this worker too
        task.env = build_environment(run, contract, out_dir=workspace / "bank", defect_files=defects.files.values(),
                                     log_dir=workspace)

    store.settle_here(settle)
    start_progress_relay(run, task)


# The relay of each build running in this process, by product code: started in pre_execute, stopped after.
_relays: dict[str, ProgressFileRelay] = {}


def start_progress_relay(run: PatchcoreRun, task: Any) -> None:
    """Show the build's progress on the Deployments page: the script (no secrets) writes its reports to
    ``$PROGRESS_FILE`` beside its log, and a thread of this task's process relays them to the run's row."""
    env = dict(task.env or {})
    if not env.get("PATCHCORE_LOG") or not db_configured(run.settings.db_conn_id):
        return
    path = Path(env["PATCHCORE_LOG"]).parent / "progress.json"
    task.env = {**env, PROGRESS_FILE_ENV: str(path)}
    stop_progress_relay(task)
    _relays[env["PRODUCT_CODE"]] = ProgressFileRelay(path, run_reporter(run, f"build {env['PRODUCT_CODE']}")).start()


def stop_progress_relay(task: Any) -> None:
    """Relay the build's last report and stop its relay (after the command, or when it failed)."""
    relay = _relays.pop((task.env or {}).get("PRODUCT_CODE", ""), None)
    if relay is not None:
        relay.stop()


def store_build_outputs(run: PatchcoreRun, task: Any) -> None:
    """After a successful build (the task's ``post_execute``): the run store keeps the build log and the
    built bank for ``approve``, ``publish`` and ``register`` (with ``storage`` it stores them, then this
    worker's workspace is removed; with ``local`` they are already where those tasks read them). A
    failure here fails the build task (it is retried)."""
    stop_progress_relay(task)
    env = task.env or {}
    store = run.product_store(env["PRODUCT_CODE"])
    store.keep_file(BUILD_LOG, env["PATCHCORE_LOG"])
    store.keep_dir(BANK_DIR, env["OUT_DIR"])  # local: recorded as the staging directory by prepare
    store.release(run.build_dir(env["PRODUCT_CODE"]), _remove_build_dir)


def store_failed_build_log(run: PatchcoreRun, task: Any) -> None:
    """When a build try fails (the task's retry and failure callbacks): the run store keeps its log, so
    the run's record names the script's error, and this worker's workspace is removed. Never raises."""
    env = task.env or {}
    try:
        stop_progress_relay(task)
        store = run.product_store(env["PRODUCT_CODE"])
        if env.get("PATCHCORE_LOG") and Path(env["PATCHCORE_LOG"]).is_file():
            store.keep_file(BUILD_LOG, env["PATCHCORE_LOG"])
        store.release(run.build_dir(env["PRODUCT_CODE"]), _remove_build_dir)
    except Exception as exc:  # a callback must not hide the build's own failure
        log.warning("Could not store the build log of %s: %s: %s", env.get("PRODUCT_CODE"), type(exc).__name__, exc)


def _remove_build_dir(workspace: Path) -> None:
    """Remove a build's local workspace (and its run's folder once no other product's build uses it)."""
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


def last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower():
            return line[-500:]
    return lines[-1][-500:] if lines else "the build script failed without output"
