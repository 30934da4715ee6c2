"""What the Deployments console shows, gathered from the published versions and ``deployment_logs``.

Nothing here knows about HTTP or Airflow's web server: :func:`live_cards` reads each artefact's
live version, kept versions and pin through :class:`~inspection_refresh.live.Releases` (the release
channel in ``channel``/``both`` mode, so a host with empty local roots shows the same cards; else the
local root), plus the few small files a version's summary needs, and which run made the live
version live and when (:mod:`.made_live`); :mod:`.history` reads the History page. Only small
JSON files are read,
never the index or bank themselves, so torch, faiss and open_clip are never imported. A problem with
one artefact (a corrupt JSON file, an unreadable pin, an unreachable channel) becomes an error on its
card, never an exception for the page.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from inspection_refresh import compose, quality_gate
from inspection_refresh.clip.index import MANIFEST_FILE
from inspection_refresh.clip.weights import RANDOM_MARKER_KEY, sidecar_path
from inspection_refresh.config import Settings
from inspection_refresh.console.made_live import RunRef, add_live_history
from inspection_refresh.live import Releases
from inspection_refresh.patchcore.bank import CONFIG_FILE, HISTOGRAM_FILE, TAU_FILE
from inspection_refresh.publish import PublishError
from inspection_refresh.registry import DeploymentRegistry
from inspection_refresh.storage import StorageError
from inspection_refresh.tasks.clip_index import INDEX_TYPES
from inspection_refresh.tasks.clip_index.quality import hygiene_findings
from inspection_refresh.tasks.common import ROLLBACK_DAG_ID
from inspection_refresh.tasks.rollback import CLIP_PREFIX

PATCHCORE_DAG_ID = "patchcore_memory_bank"
QUALITY_FILE = "quality.json"
"""The PatchCore builder's out-of-sample check beside a bank (:mod:`inspection_refresh.patchcore.quality`;
named here so the console never imports numpy)."""


def clip_dag_id(index_type: str) -> str:
    """The DAG that builds one CLIP index (``clip_index_normal``, ``clip_index_defect``)."""
    return f"clip_index_{index_type}"


PACKAGE_DAG_IDS = (*(clip_dag_id(t) for t in INDEX_TYPES), PATCHCORE_DAG_ID, ROLLBACK_DAG_ID)
"""Every DAG of this package: whose deployment rows and artefacts the console shows."""

ArtefactKind = Literal["clip", "patchcore"]
UNREACHABLE = "release channel unreachable"
"""What a card (or the page) says, with the reason, when the channel cannot be read."""


def unreachable(exc: StorageError) -> str:
    return f"{UNREACHABLE}: {exc}"


@dataclass(frozen=True)
class KeptVersion:
    version: str
    created: datetime | None
    """When it was built: the version id is that UTC time."""
    live: bool
    newer_than_live: bool = False
    """Making it live rolls forward (it was built after the live version), not back."""


@dataclass
class ArtefactCard:
    """One published artefact as the Live now page shows it."""

    kind: ArtefactKind
    name: str
    """Its name under its root: ``normal``, ``defect`` or the product code."""
    label: str
    """How the rollback DAG names it: ``clip:normal``, ``clip:defect`` or the product code."""
    title: str
    dag_id: str
    """The DAG that builds it (the user needs read access to it to see the card)."""
    live_version: str | None = None
    built_at: str | None = None
    """When the live version was built (its manifest or bank config says), not when it went live."""
    built_run: RunRef | None = None
    live_since: datetime | str | None = None
    """When the live version went live: the channel's ``current.json``, else the swap of this host's live link."""
    made_live: RunRef | None = None
    """The run that made it live: the run that published it, or the rollback that put it back."""
    made_live_how: str = "published"
    """``published``, ``rolled back`` or ``rolled forward``."""
    made_live_by: str | None = None
    facts: list[tuple[str, str]] = field(default_factory=list)
    random_weights: bool = False
    pin: dict[str, Any] | None = None
    versions: list[KeptVersion] = field(default_factory=list)
    """Newest first."""
    histogram_version: str | None = None
    """The live version, when it has a score histogram to show."""
    note: str | None = None
    """Something normal worth saying instead of facts (e.g. nothing published yet)."""
    errors: list[str] = field(default_factory=list)
    flagged: list[quality_gate.Finding] = field(default_factory=list)
    """What the build's quality checks flagged in the live version (suspected defects, gallery problems)."""


def version_time(version: str) -> datetime | None:
    """The UTC time a version id (``20261126T020000123456Z``, maybe ``-legacy``) was made, if it is one."""
    try:
        return datetime.strptime(version[:22], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _read_json_object(releases: Releases, card: ArtefactCard, file: str) -> dict[str, Any]:
    """A JSON object from the live version's ``file``; ``ValueError`` naming the file if it is missing,
    corrupt or not an object. ``StorageError`` (the channel unreachable) passes through."""
    try:
        raw = releases.read_file(card.name, str(card.live_version), file)
        if raw is None:
            raise ValueError(f"{file} is missing")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, PublishError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object")
    return data


def number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _kept_versions(releases: Releases, name: str, live: str | None) -> list[KeptVersion]:
    return [KeptVersion(v, version_time(v), v == live, bool(live) and v > str(live))  # ids sort by time
            for v in reversed(releases.versions(name))]


def _fill_base(card: ArtefactCard, releases: Releases) -> None:
    """Live version, kept versions and pin; ``StorageError`` passes through (the whole card is unknown)."""
    try:
        card.live_version = releases.current(card.name)
        card.versions = _kept_versions(releases, card.name, card.live_version)
    except (OSError, PublishError) as exc:
        card.errors.append(f"cannot list its versions: {exc}")
    try:
        card.pin = releases.pinned(card.name)
    except PublishError as exc:
        card.errors.append(str(exc))


def _clip_random_weights(manifest: dict[str, Any]) -> bool:
    """Whether the index was embedded with random demo/test weights: the manifest says so, or its
    ``pretrained`` is a checkpoint file whose sidecar carries the random-init marker."""
    if manifest.get("random_weights"):
        return True
    pretrained = manifest.get("pretrained")
    if not isinstance(pretrained, str) or os.sep not in pretrained:
        return False  # a weights tag such as "openai"
    try:
        sidecar = json.loads(sidecar_path(pretrained).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(sidecar, dict) and bool(sidecar.get(RANDOM_MARKER_KEY))


def _fill_clip(card: ArtefactCard, releases: Releases) -> None:
    manifest = _read_json_object(releases, card, MANIFEST_FILE)
    card.built_at = manifest.get("created_at") or manifest.get("written_at")
    if manifest.get("run_id"):
        card.built_run = RunRef(card.dag_id, str(manifest["run_id"]))
    card.random_weights = _clip_random_weights(manifest)
    card.facts = [
        ("Images", number(manifest.get("count"))),
        ("Embedding dim", number(manifest.get("dim"))),
        ("Model", f"{manifest.get('model')} / {manifest.get('pretrained')}"),
        ("Weights identity", str(manifest.get("model_identity") or "not recorded")),
        ("Source", f"s3://{manifest.get('source_bucket') or '?'}/{manifest.get('source_prefix') or ''}"),
    ]
    missing = manifest.get("missing_images") or []
    if missing:
        card.facts.append(("Missing images", str(len(missing))))
    hygiene = manifest.get("quality")  # the gallery check of this version (indexes since the check)
    card.flagged = hygiene_findings(card.name, hygiene if isinstance(hygiene, dict) else None)


def _fill_patchcore(card: ArtefactCard, releases: Releases) -> None:
    config = _read_json_object(releases, card, CONFIG_FILE)
    weights = config.get("weights") if isinstance(config.get("weights"), dict) else {}
    calibration = config.get("calibration") if isinstance(config.get("calibration"), dict) else {}
    card.built_at = config.get("created")
    card.random_weights = weights.get("name") == "random"
    identity = weights.get("torchvision_weights") or weights.get("path") or weights.get("name") or "not recorded"
    sha = str(weights.get("sha256") or "")
    card.facts = [
        ("Images", number(config.get("num_images"))),
        ("Bank size", f"{number(config.get('bank_size'))} × {number(config.get('feature_dim'))}"),
        ("Backbone", f"{config.get('backbone', 'resnet50')} {identity}" + (f" (sha256 {sha[:12]}…)" if sha else "")),
        ("Layers / short side / stride",
         f"{', '.join(map(str, config.get('layers') or []))} / {config.get('shorter')} / {config.get('stride')}"),
    ]
    try:
        tau = _read_json_object(releases, card, TAU_FILE)
        card.facts.append(("tau (image / pixel)", f"{number(tau.get('image'))} / {number(tau.get('pixel'))}"))
    except ValueError as exc:
        card.errors.append(str(exc))
    try:  # banks built before the out-of-sample check have no quality.json
        card.flagged = quality_gate.suspected_defects(card.name, _read_json_object(releases, card, QUALITY_FILE))
    except ValueError:
        pass
    auroc = calibration.get("auroc")
    card.facts.append(("Held-out AUROC", number(auroc, 3) if auroc is not None
                       else "n/a (no labelled defect images)"))
    card.facts.append(("Accuracy at tau", number(calibration.get("accuracy_at_tau"), 3)))
    # Every published bank has one (publishing validates BANK_FILES): the channel is not asked twice per card.
    local = releases.local_copy(card.name, str(card.live_version)) if releases.channel is None else None
    if releases.channel is not None or (local is not None and (local / HISTOGRAM_FILE).is_file()):
        card.histogram_version = card.live_version


def artefact_card(kind: ArtefactKind, name: str, releases: Releases) -> ArtefactCard:
    """One artefact's card from its releases alone; problems (an unreachable channel too) become ``errors``."""
    if kind == "clip":
        card = ArtefactCard(kind, name, f"{CLIP_PREFIX}{name}", f"CLIP {name} index", clip_dag_id(name))
    else:
        card = ArtefactCard(kind, name, name, f"PatchCore bank {name}", PATCHCORE_DAG_ID)
    try:
        _fill_base(card, releases)
        if card.live_version is None:
            _no_live_version(card, releases)
            return card
        try:
            (_fill_clip if kind == "clip" else _fill_patchcore)(card, releases)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            card.errors.append(f"version {card.live_version}: {exc}")
    except StorageError as exc:
        card.errors.append(unreachable(exc))
    return card


def _no_live_version(card: ArtefactCard, releases: Releases) -> None:
    """Why a card has no live version: nothing published, a broken live link, or not in the channel yet."""
    local = releases.publisher.current(card.name) if releases.channel is not None else None
    if local:
        card.note = (f"Not in the release channel yet: this host's root has version {local} live. "
                     "'inspection-publish push' makes it the channel's current version.")
    elif card.versions:
        card.errors.append("no live version: the live link is missing or is not a published version"
                           if releases.channel is None else f"no live version: {releases.where} has no current.json")
    elif not card.errors:
        card.note = "Nothing published yet."


def live_cards(settings: Settings, registry: DeploymentRegistry,
               readable_dag_ids: frozenset[str] | set[str]) -> tuple[list[ArtefactCard], list[str]]:
    """Cards for the artefacts whose DAG the user may read (CLIP indexes, then banks by product code),
    and page-level problems (history unavailable, a releases directory or the channel unreadable)."""
    problems: list[str] = []
    cards: list[ArtefactCard] = []
    indexes: Releases | None = None
    releases: dict[str, Releases] = {}
    try:
        indexes = releases["clip"] = Releases(compose.index_publisher(settings))  # one per page: reads are memoised
        cards += [artefact_card("clip", t, indexes) for t in INDEX_TYPES if clip_dag_id(t) in readable_dag_ids]
    except (OSError, PublishError) as exc:
        problems.append(f"CLIP indexes: {exc}")
    if PATCHCORE_DAG_ID in readable_dag_ids:
        try:
            if indexes is not None and indexes.unreachable is not None:
                raise indexes.unreachable  # the same connection and bucket: not a second wait for a timeout
            banks = releases["patchcore"] = Releases(compose.patchcore_publisher(settings))
            cards += [artefact_card("patchcore", code, banks) for code in banks.names()]
        except StorageError as exc:  # which banks exist is unknown: no cards, one notice
            problems.append(f"PatchCore banks: {unreachable(exc)}")
        except (OSError, PublishError) as exc:
            problems.append(f"PatchCore banks: {exc}")
    problem = add_live_history(cards, releases, registry)
    if problem:
        problems.append(problem)
    return cards, problems


def histogram(settings: Settings, name: str, version: str) -> Path | bytes | None:
    """The score histogram of a kept version of a PatchCore bank: its file on this host (no channel),
    its bytes from the release channel, or None. ``StorageError`` if the channel is unreachable.

    ``name`` and ``version`` come from the URL: they are only compared with the names and
    versions listed (on disk or in the channel) before anything is read.
    """
    releases = Releases(compose.patchcore_publisher(settings))
    if releases.channel is None:
        return histogram_path(settings, name, version)
    try:
        if version not in releases.versions(name):
            return None
        return releases.read_file(name, version, HISTOGRAM_FILE)
    except PublishError:  # an invalid name or version
        return None


def histogram_path(settings: Settings, name: str, version: str) -> Path | None:
    """The score histogram of a kept version of a PatchCore bank on this host, or None.

    ``name`` and ``version`` come from the URL: they are only compared with the names and
    versions listed on disk, and the file's real path must lie inside that version's
    directory, so no path outside a published version can be served.
    """
    publisher = compose.patchcore_publisher(settings)
    try:
        if name not in publisher.names() or version not in publisher.versions(name):
            return None
    except (OSError, PublishError):
        return None
    releases = Path(os.path.realpath(publisher.releases))
    version_dir = Path(os.path.realpath(publisher.releases / name / version))
    candidate = Path(os.path.realpath(version_dir / HISTOGRAM_FILE))
    # Links (a version directory or a histogram that is a symlink) must not lead outside the version.
    if version_dir.parent.parent != releases or candidate.parent != version_dir or not candidate.is_file():
        return None
    return candidate
