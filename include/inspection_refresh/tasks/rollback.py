"""The ``deployment_rollback`` DAG as plain functions: ``roll_back`` (or unpin) -> ``register``.

An artefact is ``clip:normal`` or ``clip:defect`` (a CLIP index) or a PatchCore product
code. Rolling back is :meth:`Publisher.rollback` with a pin, the same code as
``inspection-publish rollback``: the version becomes live with one symlink swap, and
the pin makes scheduled runs leave the artefact alone until a manual run publishes a
new version or someone unpins it.

With a release channel (``channel``/``both``) the channel says which artefacts and versions
exist and which one is live (:class:`~inspection_refresh.live.Releases`): a rollback requested
from a host with empty local roots (the console's API server) is accepted, and
:meth:`Publisher.rollback` brings the version to this worker if it lacks it.

The swap needs no database; the ``deployment_logs`` row is written by the
separate ``register`` task, so a rollback works even while the database is down
(register retries), and a retried register never rolls back a second time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from inspection_refresh import compose
from inspection_refresh.config import Settings, get_settings
from inspection_refresh.live import Releases
from inspection_refresh.publish import Publisher, PublishError, check_name
from inspection_refresh.runstore import RunStore, run_work_dir
from inspection_refresh.runtime import PermanentError
from inspection_refresh.tasks.clip_index import INDEX_TYPES
from inspection_refresh.tasks.common import ROLLBACK_DAG_ID, recorded_outcome
from inspection_refresh.tasks.stages import read_stages, record_stage

log = logging.getLogger(__name__)

DEPLOY_TYPE = "rollback"
PIPELINE = "rollback"
CLIP_PREFIX = "clip:"
PREVIOUS = "previous"
"""The ``version`` param's default: the newest kept version older than the live one."""
STAGE = "rollback"


@dataclass(frozen=True)
class Artefact:
    """A published artefact: its name under its root, and the publisher of that root."""

    name: str
    """Its name under its root: ``normal``, ``defect`` or the product code."""
    publisher: Publisher

    def live_version(self) -> str | None:
        """What is live now: the channel's ``current.json`` with a channel, else this host's live link."""
        return Releases(self.publisher).current(self.name)


def resolve_artefact(label: str, settings: Settings) -> Artefact:
    """The artefact ``label`` names; a clear :class:`PermanentError` if it names nothing published."""
    label = label.strip()
    if label.startswith(CLIP_PREFIX):
        name = label[len(CLIP_PREFIX):]
        if name not in INDEX_TYPES:
            raise PermanentError(f"unknown CLIP index {label!r}: use clip:normal or clip:defect")
        publisher = compose.index_publisher(settings)
    else:
        try:
            name = check_name(label)
        except PublishError as exc:
            raise PermanentError(f"{exc}; the artefact is clip:normal, clip:defect or a product code") from None
        publisher = compose.patchcore_publisher(settings)
    releases = Releases(publisher)
    if not publisher.versions(name) and not (releases.channel is not None and releases.versions(name)):
        indexes, banks = Releases(compose.index_publisher(settings)), Releases(compose.patchcore_publisher(settings))
        known = [CLIP_PREFIX + n for n in indexes.names()] + banks.names()
        where = f"{releases.where} or {publisher.releases}" if releases.channel is not None else str(publisher.releases)
        raise PermanentError(f"nothing of {label!r} is published in {where}; "
                             f"artefacts with kept versions: {', '.join(known) or 'none'}")
    return Artefact(name, publisher)


@dataclass(frozen=True)
class RollbackRun:
    """One run's identity and the operator's choices (the DAG params)."""

    run_id: str
    artefact: str
    version: str = PREVIOUS
    unpin: bool = False
    deployed_by: str | None = None
    dag_id: str = ROLLBACK_DAG_ID
    settings: Settings = field(default_factory=get_settings)

    @property
    def work_dir(self) -> Path:
        """The run's work directory on this host (what the ``local`` run store uses)."""
        return run_work_dir(self.settings.cache_root, PIPELINE, self.run_id)

    @cached_property
    def store(self) -> RunStore:
        """Where ``rollback`` leaves its record for ``register`` (``INSPECTION_RUN_STORE``)."""
        return compose.run_store(PIPELINE, self.run_id, self.settings)

    @property
    def action(self) -> str:
        return "unpin" if self.unpin else "rollback"


def roll_back(run: RollbackRun) -> dict[str, Any]:
    """Re-publish the requested version and pin it, or (``unpin``) remove the pin; returns what changed."""
    run.store.sweep()  # what failed runs left, after INSPECTION_RUN_RETENTION_DAYS
    with record_stage(run.store, STAGE) as stage:
        stage.facts = {"artefact": run.artefact, "action": run.action}  # recorded even if what follows fails
        artefact = resolve_artefact(run.artefact, run.settings)
        publisher, name = artefact.publisher, artefact.name
        stage.facts["from_version"] = artefact.live_version()
        if run.unpin:
            stage.facts["removed_pin"] = publisher.unpin(name)
        else:
            wanted = run.version.strip()
            release = publisher.rollback(name, None if wanted in ("", PREVIOUS) else wanted,
                                         pinned_by=run.deployed_by or "unknown", run_id=run.run_id)
            stage.facts.update(to_version=release.version, pin=publisher.pinned(name))
        stage.facts["path"] = str(publisher.live_path(name))
        return dict(stage.facts)


def _live_version(run: RollbackRun) -> str | None:
    """What is live now, for a failure message (``None`` if the artefact cannot be resolved)."""
    try:
        return resolve_artefact(run.artefact, run.settings).live_version()
    except Exception:  # the reason is already in the message
        return None


def _message(run: RollbackRun, record: dict[str, Any]) -> tuple[str, str]:
    """(status, result_message) of the run's deployment row."""
    facts, by = record["facts"], run.deployed_by or "unknown"
    if record["status"] != "ok":
        live = _live_version(run)  # normally what was live before; a failed pin leaves the swap done
        return "failed", (f"{run.artefact} {run.action} failed: {record['message']}."
                          + (f" Live version: {live}." if live else ""))
    if run.unpin:
        if not facts.get("removed_pin"):
            return "completed", f"{run.artefact} was not pinned; nothing changed (version {facts['from_version']} live)"
        return "completed", (f"{run.artefact} unpinned by {by}: version {facts['from_version']} stays live "
                             "and scheduled runs deploy it again")
    return "completed", (f"{run.artefact} rolled back from {facts['from_version']} to {facts['to_version']} by {by}; "
                         "pinned: scheduled runs leave it alone until a manual run publishes a new version "
                         "or it is unpinned")


def register(run: RollbackRun) -> dict[str, Any]:
    """Write the run's ``rollback`` row in ``deployment_logs`` as completed or failed; return the outcome."""
    registry = compose.deployment_registry(run.settings.db_conn_id)
    record = read_stages(run.store, [STAGE])[STAGE]
    if record["status"] == "not run":
        recorded = recorded_outcome(registry, run.dag_id, run.run_id)  # a cleared register of a completed run
        if recorded:
            return recorded
    status, text = _message(run, record)
    facts = record["facts"]
    result_data = {"artefact": run.artefact, "action": run.action, "requested_version": run.version,
                   "from_version": facts.get("from_version"), "to_version": facts.get("to_version"),
                   "pin": facts.get("pin"), "removed_pin": facts.get("removed_pin"), "path": facts.get("path")}
    deploy_id = registry.finish(DEPLOY_TYPE, run.dag_id, run.run_id, status=status, message=text,
                                result_data=result_data, deployed_by=run.deployed_by)
    log.info("%s", text)
    if status == "completed":
        run.store.remove_run()
    return {"deploy_id": deploy_id, "status": status, "message": text, **result_data}
