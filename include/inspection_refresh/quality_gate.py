"""The quality gate: what a run found wrong with its data or its result, and what that does to publishing.

Findings come from the detectors that run with every build (PatchCore: normal images that score above tau
out of sample, ``quality.json`` beside the bank; CLIP: gallery hygiene, :mod:`inspection_refresh.clip.hygiene`)
and from comparing the new version with the live one (:func:`bank_regressions`, :func:`index_regressions`).
:func:`decide` turns them into what the run does, by the gate's mode:

- ``off`` — nothing is checked for the decision: publish as before (the build's reports are still recorded);
- ``warn`` — publish, and say what was flagged in the deployment row, the approval request and the console;
- ``approve`` — anything flagged requires a person's approval before publishing (even without ``require_approval``);
- ``block`` — a flagged artefact is not published: its live version stays and the run is recorded ``failed``
  naming what was flagged. Per artefact: a blocked PatchCore product does not stop the others.

Default margins (:class:`Margins`, settings ``INSPECTION_QUALITY_*``) and why:

- AUROC drop > 0.05: the held-out AUROC of a small labelled defect set moves by a few hundredths between
  rebuilds of the same data (one or two images changing rank); a drop of more than 0.05 is a bank that
  separates defects measurably worse.
- tau outside [live / 2, live x 2]: tau is the 99th-percentile score of held-out normal images; new images of
  the same product move it by tens of percent. Halving it makes the line reject good parts, doubling it
  lets defects through: either is a different product or broken data, not drift.
- suspected defects at >= 1.05 x tau: a clean product's out-of-sample scores end in a tail just above tau
  (tau is a high percentile of a few dozen held-out scores; clean builds list one or two images at
  1.00-1.04 x tau), while a defect photo among the normals scores clearly above it. Every image above tau
  is still listed in the reports; only those at the margin or above flag the run.
- CLIP losing > 20 % of its images: deliberate clean-ups remove a few percent; losing a fifth at once is a
  listing cut short, a wrong prefix or a deleted folder, and the service would stop finding those parts.

A leaf: no Airflow, nothing of the package; findings and decisions are plain data (``to_dict``) that the
tasks keep in the run store and the deployment row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MODES = ("off", "warn", "approve", "block")
PUBLISH, ASK, BLOCK = "publish", "ask", "block"
SHOWN_FILES = 5
"""Files named in a finding's one-line message (all of them, up to a limit, are in ``files``)."""


@dataclass(frozen=True)
class Margins:
    """How far a new version may move from the live one before the gate flags it (see the module doc)."""

    auroc_drop: float = 0.05
    """Flag a bank whose held-out AUROC is more than this below the live bank's (both measured)."""
    tau_factor: float = 2.0
    """Flag a bank whose image tau is more than this factor above or below the live bank's."""
    images_lost: float = 0.20
    """Flag a CLIP index with more than this share of the live index's images fewer."""
    suspect_ratio: float = 1.05
    """Flag a bank whose normal images include one scoring at least this multiple of tau out of sample."""

    def __post_init__(self) -> None:
        if not (0 <= self.auroc_drop <= 1 and self.tau_factor > 1 and 0 <= self.images_lost <= 1
                and self.suspect_ratio >= 1):
            raise ValueError(f"quality gate margins out of range: {self}; use an AUROC drop in [0, 1], "
                             "a tau factor above 1, an image share in [0, 1] and a suspect ratio of 1 or more")


@dataclass(frozen=True)
class Finding:
    """One thing flagged about one artefact (``normal``/``defect`` index, a product code)."""

    artefact: str
    check: str
    """What found it: ``suspected_defects``, ``exact_duplicates``, ``auroc_drop``, ``images_lost``, ..."""
    message: str
    """One line for people, naming the first few files."""
    files: tuple[str, ...] = ()
    count: int = 0
    """How many items (files, pairs, groups) it counts; ``files`` may list fewer."""

    def to_dict(self) -> dict[str, Any]:
        return {"artefact": self.artefact, "check": self.check, "message": self.message,
                "files": list(self.files), "count": self.count}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Finding":
        return cls(str(data["artefact"]), str(data["check"]), str(data["message"]),
                   tuple(str(f) for f in data.get("files", ())), int(data.get("count", 0)))


@dataclass(frozen=True)
class GateDecision:
    """What the gate does with a run's findings.

    ``action``: ``publish`` (nothing flagged, or ``off``/``warn``), ``ask`` (``approve`` and something
    flagged: a person must approve) or ``block`` (``block`` and something flagged: ``blocked`` names the
    artefacts that are not published; the others publish as usual). ``reasons``: one line per finding.
    """

    mode: str
    action: str
    reasons: list[str]
    findings: list[Finding] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)
    """Artefact -> why it is not published (``block`` only)."""
    checked: list[str] = field(default_factory=list)
    """The artefacts the run would publish (all were checked); :attr:`all_blocked` compares them."""

    @property
    def all_blocked(self) -> bool:
        """Every artefact the run would publish is blocked: nothing publishes."""
        return bool(self.blocked) and set(self.checked) <= set(self.blocked)

    @property
    def flagged(self) -> list[str]:
        """The artefacts with findings, in order."""
        return list(dict.fromkeys(f.artefact for f in self.findings))

    def for_artefact(self, artefact: str) -> list[Finding]:
        return [f for f in self.findings if f.artefact == artefact]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "action": self.action, "reasons": list(self.reasons),
                "findings": [f.to_dict() for f in self.findings], "blocked": dict(self.blocked),
                "checked": list(self.checked)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GateDecision":
        return cls(str(data["mode"]), str(data["action"]), list(data.get("reasons", [])),
                   [Finding.from_dict(f) for f in data.get("findings", [])], dict(data.get("blocked", {})),
                   list(data.get("checked", [])))


def check_mode(mode: str) -> str:
    """``mode`` lower-cased, or ``ValueError`` naming the modes."""
    value = str(mode).strip().lower()
    if value not in MODES:
        raise ValueError(f"quality gate mode {mode!r} is not one of {', '.join(MODES)}")
    return value


def decide(mode: str, findings: Iterable[Finding], checked: Iterable[str] = ()) -> GateDecision:
    """The gate's decision for ``findings`` under ``mode`` (:data:`MODES`); see :class:`GateDecision`.
    ``checked``: the artefacts the run would publish (default: those with findings)."""
    mode = check_mode(mode)
    found = list(findings)
    checked = list(dict.fromkeys([*checked, *(f.artefact for f in found)]))
    reasons = [f"{f.artefact}: {f.message}" for f in found]
    if mode == "off":  # not checked: the detectors' reports stay in their own records
        return GateDecision(mode, PUBLISH, [], checked=checked)
    if not found:
        return GateDecision(mode, PUBLISH, [], checked=checked)
    if mode == "warn":
        return GateDecision(mode, PUBLISH, reasons, found, checked=checked)
    if mode == "approve":
        return GateDecision(mode, ASK, reasons, found, checked=checked)
    blocked = {artefact: "blocked by the quality gate: " + "; ".join(
        f.message for f in found if f.artefact == artefact) for artefact in dict.fromkeys(f.artefact for f in found)}
    return GateDecision(mode, BLOCK, reasons, found, blocked, checked)


def _named(files: Sequence[str], count: int) -> str:
    shown = ", ".join(files[:SHOWN_FILES])
    return shown + (f" and {count - SHOWN_FILES} more" if count > SHOWN_FILES else "")


def _counted(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def suspected_defects(artefact: str, quality: Mapping[str, Any] | None, margins: Margins = Margins()) -> list[Finding]:
    """PatchCore's ``quality.json``: normal images that score at least ``margins.suspect_ratio`` x tau out of
    sample (highest first); those just above tau stay in the report only."""
    suspects = [s for s in (quality or {}).get("suspected_defects") or []
                if float(s.get("score_over_tau") or 0) >= margins.suspect_ratio]
    if not suspects:
        return []
    files = tuple(str(s["file"]) for s in suspects)
    scored = quality.get("images_scored")
    shown = ", ".join(f"{s['file']} ({float(s['score']):.3g})" for s in suspects[:SHOWN_FILES])
    more = f" and {len(suspects) - SHOWN_FILES} more" if len(suspects) > SHOWN_FILES else ""
    of = f" of {scored}" if scored else ""
    return [Finding(artefact, "suspected_defects",
                    f"{_counted(len(suspects), 'normal image')}{of} score {margins.suspect_ratio:g}x tau or more out of "
                    f"sample (suspected defects; tau {float(quality.get('tau', 0)):.3g}): {shown}{more}", files, len(suspects))]


def bank_regressions(artefact: str, live: Mapping[str, Any] | None, new: Mapping[str, Any] | None,
                     margins: Margins = Margins()) -> list[Finding]:
    """A new bank against the live one: held-out AUROC dropping by more than ``margins.auroc_drop`` (only
    when both were measured, i.e. labelled defects exist), image tau moving by more than ``margins.tau_factor``.
    ``live``/``new``: ``{"auroc": float | None, "tau": {"image": float, ...}}``; nothing live: no findings."""
    if not live or not new:
        return []
    found = []
    before, after = live.get("auroc"), new.get("auroc")
    if before is not None and after is not None and float(before) - float(after) > margins.auroc_drop:
        found.append(Finding(artefact, "auroc_drop", f"held-out AUROC fell from {float(before):.3f} to "
                             f"{float(after):.3f} (more than {margins.auroc_drop:g} below the live bank)"))
    tau_before = (live.get("tau") or {}).get("image")
    tau_after = (new.get("tau") or {}).get("image")
    if tau_before and tau_after and float(tau_before) > 0:
        ratio = float(tau_after) / float(tau_before)
        if not 1 / margins.tau_factor <= ratio <= margins.tau_factor:
            found.append(Finding(artefact, "tau_shift", f"image tau moved from {float(tau_before):.4g} to "
                                 f"{float(tau_after):.4g} (x{ratio:.2f}; allowed x{1 / margins.tau_factor:.2f}"
                                 f"–x{margins.tau_factor:.2f} of the live bank's)"))
    return found


def index_regressions(artefact: str, live_count: int | None, new_count: int | None,
                      margins: Margins = Margins()) -> list[Finding]:
    """A new CLIP index with more than ``margins.images_lost`` of the live index's images fewer."""
    if not live_count or new_count is None:
        return []
    lost = (live_count - new_count) / live_count
    if lost <= margins.images_lost:
        return []
    return [Finding(artefact, "images_lost", f"{live_count - new_count} of the live index's {live_count} images "
                    f"are gone ({lost:.0%}; more than {margins.images_lost:.0%}): {new_count} left", (),
                    live_count - new_count)]


GALLERY_CHECKS = {
    # check: (one, many, how an item is written)
    "exact_duplicates": ("exact duplicate", None, lambda g: " = ".join(g)),
    "near_duplicates": ("near-duplicate pair", None, lambda p: f"{p[0]} ≈ {p[1]} (cosine {float(p[2]):.3f})"),
    "in_both_galleries": ("image also in the other gallery", "images also in the other gallery",
                          lambda p: f"{p[0]} (there: {p[1]})"),
    "product_outliers": ("product outlier", None, lambda o: f"{o[0]} (filed under {o[1]}, looks like {o[2]})"),
}
"""The CLIP gallery report's lists (``GalleryReport.to_dict()``) the gate flags, and how each is named."""


def gallery_findings(artefact: str, counts: Mapping[str, int], lists: Mapping[str, Sequence[Any]]) -> list[Finding]:
    """The CLIP gallery report (``counts()`` and the lists of ``to_dict()``) as findings, one per check that
    found something. Files: the first file of each listed item (a duplicate group's, a pair's first)."""
    found = []
    for check, (one, many, written) in GALLERY_CHECKS.items():
        count = int(counts.get(check) or 0)
        items = [item for item in (lists.get(check) or []) if isinstance(item, (list, tuple))]
        if not count:
            continue
        files = tuple(str(f) for item in items for f in (item if check == "exact_duplicates" else item[:1]))
        found.append(Finding(artefact, check, f"{_counted(count, one, many)}: "
                             + _named([written(item) for item in items], max(count, len(items))), files, count))
    return found


def failed_check(artefact: str, check: str, error: BaseException | str) -> Finding:
    """A detector that could not run: flagged, so a gate in ``approve``/``block`` does not pass it unseen."""
    return Finding(artefact, check, f"the {check} check could not run ({error}); nothing was checked")


def markdown(decision: GateDecision) -> list[str]:
    """The approval request's "Quality gate" section (no lines when nothing was flagged)."""
    if not decision.findings:
        return []
    what = {PUBLISH: "publishing anyway (warn)", ASK: "approval required (approve)",
            BLOCK: "flagged artefacts are NOT published (block)"}[decision.action]
    lines = [f"**Quality gate — {len(decision.findings)} finding(s), {what}:**"]
    for finding in decision.findings:
        blocked = " — BLOCKED" if finding.artefact in decision.blocked else ""
        lines.append(f"- **{finding.artefact}** ({finding.check}){blocked}: {finding.message}")
    return lines
