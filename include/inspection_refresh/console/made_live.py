"""Which run made each card's live version live, and when; who built it.

A version is published once; an "unchanged" run later names it again without making anything live, and
a rollback (or roll forward) can make it live again, so the publishing run is not always the answer.
The truth, in order: the release channel's ``current.json`` (its ``published_at``, ``run_id`` and
``action``); the pin a rollback leaves (it names its run); ``deployment_logs`` (the newest completed
rollback to the version, else the run that published it, never an "unchanged" one); and, without a
channel, the moment this host's live link was swapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from inspection_refresh.live import Releases
from inspection_refresh.publish import PublishError
from inspection_refresh.registry import DeploymentRegistry, RegistryError
from inspection_refresh.storage import StorageError
from inspection_refresh.tasks.clip_index import DEPLOY_TYPE as CLIP_DEPLOY_TYPE
from inspection_refresh.tasks.common import ROLLBACK_DAG_ID
from inspection_refresh.tasks.patchcore import DEPLOY_TYPE as PATCHCORE_DEPLOY_TYPE
from inspection_refresh.tasks.rollback import DEPLOY_TYPE as ROLLBACK_DEPLOY_TYPE


@dataclass
class RunRef:
    """An Airflow DAG run, to link to."""

    dag_id: str
    run_id: str


class ArtefactCard(Protocol):
    """What this module reads and fills of a :class:`~inspection_refresh.console.data.ArtefactCard`."""

    kind: str
    name: str
    label: str
    dag_id: str
    live_version: str | None
    pin: dict[str, Any] | None
    random_weights: bool
    built_run: RunRef | None
    live_since: datetime | str | None
    made_live: RunRef | None
    made_live_how: str
    made_live_by: str | None
    errors: list[str]


def db_time_utc(value: Any, utc_offset: int | None) -> datetime | str | None:
    """A ``deployment_logs`` time (``2026-11-26 02:00:00``, in the database session's zone, ``utc_offset``
    seconds ahead of UTC) as a UTC datetime; as it is when the offset is unknown or it is not a time."""
    if value is None or value == "" or utc_offset is None:
        return value
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return value
    if moment.tzinfo is None:
        moment = (moment - timedelta(seconds=utc_offset)).replace(tzinfo=timezone.utc)
    return moment


def _live_history_lookups(card: ArtefactCard) -> list[tuple[str, dict[str, str]]]:
    """Where ``deployment_logs`` may say who made the live version live: the rows naming it as published
    (an "unchanged" run names it too, so rows are checked by :func:`_made_it_live`), and rollbacks to it."""
    version = str(card.live_version)
    if card.kind == "clip":
        publishing = (CLIP_DEPLOY_TYPE, {"$.index_type": card.name, "$.version": version})
    else:  # product codes are letters, digits and "._-" (check_name), so quoting one in a JSON path is safe
        publishing = (PATCHCORE_DEPLOY_TYPE, {f'$.products."{card.name}".version': version})
    return [publishing, (ROLLBACK_DEPLOY_TYPE, {"$.artefact": card.label, "$.to_version": version})]


def _made_it_live(card: ArtefactCard, row: dict[str, Any]) -> bool:
    """Whether the row's run made the live version live (not an "unchanged" run, a failed one, a rejection)."""
    data = row.get("result_data") if isinstance(row.get("result_data"), dict) else {}
    if row.get("deploy_type") == ROLLBACK_DEPLOY_TYPE:
        return row.get("status") == "completed" and data.get("action", "rollback") == "rollback"
    if card.kind == "clip":
        return row.get("status") == "completed" and not data.get("unchanged")
    product = (data.get("products") or {}).get(card.name) or {}
    return isinstance(product, dict) and product.get("status") == "published"


def _row_run(row: dict[str, Any]) -> RunRef | None:
    data = row.get("result_data") if isinstance(row.get("result_data"), dict) else {}
    if data.get("airflow_dag_id") and data.get("airflow_run_id"):
        return RunRef(str(data["airflow_dag_id"]), str(data["airflow_run_id"]))
    return None


def _rolled(card: ArtefactCard, from_version: Any) -> str:
    return "rolled forward" if from_version and str(card.live_version) > str(from_version) else "rolled back"


def _live_link_time(releases: Releases, name: str) -> datetime | None:
    """When this host's live link was last swapped (it is made new each time, then renamed over the old)."""
    try:
        return datetime.fromtimestamp(os.lstat(releases.publisher.live_path(name)).st_mtime, timezone.utc)
    except OSError:
        return None


def _apply_live_history(card: ArtefactCard, releases: Releases, publishing: list[dict[str, Any]],
                        rollbacks: list[dict[str, Any]], utc_offset: int | None) -> None:
    """Fill who built the live version, and which run made it live and when.

    A version is published once, and can only be rolled back (or forward) to after that, and publishing
    removes the pin: so the rollback that pinned it (a pin names its run), else the newest completed
    rollback to it, else the run that published it, made it live. With a channel its ``current.json``
    names the run and the time itself, and wins.
    """
    built = next((row for row in publishing if _made_it_live(card, row)), None)
    rollback = next((row for row in rollbacks if _made_it_live(card, row)), None)
    if built is not None:
        card.built_run = _row_run(built) or card.built_run
        data = built.get("result_data") if isinstance(built.get("result_data"), dict) else {}
        card.random_weights = card.random_weights or bool(data.get("random_weights"))
    pin = card.pin if card.pin and card.pin.get("version") == card.live_version and card.pin.get("run_id") else None
    if pin and (rollback is None or _row_run(rollback) != RunRef(ROLLBACK_DAG_ID, str(pin["run_id"]))):
        card.made_live, card.made_live_by = RunRef(ROLLBACK_DAG_ID, str(pin["run_id"])), pin.get("pinned_by")
        card.made_live_how, card.live_since = "rolled back", pin.get("pinned_at")  # its row is not written yet
    elif rollback or built:
        maker = rollback or built
        card.made_live, card.made_live_by = _row_run(maker), maker.get("deployed_by")
        card.live_since = db_time_utc(maker.get("completed_at"), utc_offset)
        if maker is rollback:
            card.made_live_how = _rolled(card, (rollback.get("result_data") or {}).get("from_version"))
    else:
        card.made_live = card.built_run  # no row: the manifest's run built and published it
    pointer = releases.pointer(card.name) if releases.channel is not None else None
    if pointer and pointer.get("version") == card.live_version:
        card.live_since = pointer.get("published_at") or card.live_since
        if pointer.get("run_id"):
            rollback_pointer = pointer.get("action") == "rollback"
            run = RunRef(ROLLBACK_DAG_ID if rollback_pointer else card.dag_id, str(pointer["run_id"]))
            if run != card.made_live:
                card.made_live, card.made_live_by = run, pointer.get("published_by")
                card.made_live_how = _rolled(card, pointer.get("previous")) if rollback_pointer else "published"
    elif releases.channel is None:
        card.live_since = _live_link_time(releases, card.name) or card.live_since


def add_live_history(cards: list[ArtefactCard], releases: dict[str, Releases],
                      registry: DeploymentRegistry) -> str | None:
    """Who built each live version, which run made it live and when (``deployment_logs``, the channel's
    ``current.json`` or the live link, the pin); an error text if the history is unreadable."""
    wanted = [card for card in cards if card.live_version]
    if not wanted:
        return None
    problem, found, offset = None, [[[], []] for _ in wanted], None
    try:
        rows = registry.newest_by_result_values([lookup for card in wanted for lookup in _live_history_lookups(card)])
        found = [rows[i:i + 2] for i in range(0, len(rows), 2)]
        offset = registry.utc_offset_seconds()
    except RegistryError as exc:
        if "doesn't exist" not in str(exc):  # else: no deployment has been recorded yet
            problem = f"deployment history unavailable, so cards may not name the run that made them live: {exc}"
    for card, (publishing, rollbacks) in zip(wanted, found):
        try:
            _apply_live_history(card, releases[card.kind], publishing, rollbacks, offset)
        except (StorageError, PublishError, OSError) as exc:
            card.errors.append(f"when it went live is unknown: {exc}")
    return problem
