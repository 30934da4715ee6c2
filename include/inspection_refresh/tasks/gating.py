"""The quality gate inside a run: which mode applies, where its decision is kept, and what it says.

The ``approve`` task (:class:`inspection_refresh.operators.PublishApproval`) asks the pipeline for the gate's
decision (:func:`inspection_refresh.tasks.clip_index.quality.quality_check`,
:func:`inspection_refresh.tasks.patchcore.quality.quality_check`) before anything else, keeps it in the run
store (:data:`GATE_FILE`), forces the approval when it says ``ask`` and stops what it blocks. ``publish``
refuses a blocked artefact (:func:`require_not_blocked`) and ``register`` writes the decision into the
deployment row (:func:`gate_facts`, :func:`flagged_note`). Nothing here imports Airflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inspection_refresh.config import Settings
from inspection_refresh.quality_gate import GateDecision, Margins, check_mode
from inspection_refresh.runstore import RunFileMissing, RunStore
from inspection_refresh.tasks.common import NothingToDo

QUALITY_PARAM = "quality_gate"
"""The DAG param choosing a manual run's gate mode."""
MANUAL_DEFAULT = "warn"
"""A manual run's mode unless its form says otherwise: the person who triggered it reads the report."""
GATE_FILE = "quality-gate.json"


def gate_mode(params: Mapping[str, Any], scheduled: bool, settings: Settings) -> str:
    """A scheduled run's mode is ``INSPECTION_QUALITY_GATE``; a manual run's the ``quality_gate`` param."""
    return settings.quality_gate if scheduled else check_mode(params.get(QUALITY_PARAM) or MANUAL_DEFAULT)


def margins(settings: Settings) -> Margins:
    return Margins(auroc_drop=settings.quality_auroc_drop, tau_factor=settings.quality_tau_factor,
                   images_lost=settings.quality_images_lost, suspect_ratio=settings.quality_suspect_ratio)


def record_gate(store: RunStore, decision: GateDecision) -> None:
    store.write_json(GATE_FILE, decision.to_dict())


def read_gate(store: RunStore) -> GateDecision | None:
    """The run's gate decision, or ``None`` when the approve step did not check (or has not run)."""
    try:
        return GateDecision.from_dict(store.read_json(GATE_FILE))
    except RunFileMissing:
        return None


def blocked_reason(store: RunStore, artefact: str) -> str | None:
    gate = read_gate(store)
    return gate.blocked.get(artefact) if gate else None


def require_not_blocked(store: RunStore, artefact: str, what: str) -> None:
    """Raise :class:`NothingToDo` if the gate blocked ``artefact`` (``what`` names it for the message)."""
    reason = blocked_reason(store, artefact)
    if reason:
        raise NothingToDo(f"{what} is not published: {reason}")


def gate_facts(store: RunStore) -> dict[str, Any]:
    """The ``quality_gate`` part of a deployment row's ``result_data``."""
    gate = read_gate(store)
    return gate.to_dict() if gate else {"action": "not checked"}


def flagged_note(store: RunStore, artefacts: list[str] | None = None) -> str:
    """``Quality gate (warn) flagged: <reasons>`` for a deployment row's message ("" when nothing was
    flagged or the gate is off); ``artefacts``: only those."""
    gate = read_gate(store)
    if gate is None:
        return ""
    reasons = [f"{f.artefact}: {f.message}" for f in gate.findings if artefacts is None or f.artefact in artefacts]
    return f"Quality gate ({gate.mode}) flagged: {'; '.join(reasons)}" if reasons else ""


def with_note(text: str, note: str) -> str:
    """``text`` with ``note`` as its last sentence."""
    return f"{text.rstrip('. ')}. {note}" if note else text
