"""The CLIP run's quality checks: the gallery's hygiene (``index_save``, with the embeddings at hand) and the
quality gate's findings before publishing (:func:`quality_check`, called by the ``approve`` task).

Hygiene (:func:`inspection_refresh.clip.hygiene.check_gallery`) needs each image's embedding, the sha256 of its
file, its product, and the sha256s of the other gallery's live images (normal <-> defect), which every index
since this check names in its ``manifest.json`` (``image_sha256``: storage key -> sha256). The report is kept
in the ``index_save`` stage record (for the gate, the approval request and the deployment row) and, as
``quality``, in the version's ``manifest.json`` (for the console card of the staged and the live version).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from inspection_refresh import quality_gate
from inspection_refresh.manifests import file_sha256
from inspection_refresh.publish import PublishError
from inspection_refresh.tasks.clip_index.run import INDEX_TYPES, ClipRun, published_manifest
from inspection_refresh.tasks.gating import margins

log = logging.getLogger(__package__)  # the pipeline's one logger, named as before it was split

HYGIENE_CHECK = "gallery_hygiene"
LISTED = 50
"""Items kept per hygiene list in the stage record and the manifest (counts stay exact)."""


def other_gallery(run: ClipRun) -> dict[str, str] | None:
    """sha256 -> storage key of the other index type's live images (its manifest's ``image_sha256``), or
    ``None`` when nothing is live there or its version predates the check (then it is not compared)."""
    other = next(t for t in INDEX_TYPES if t != run.index_type)
    releases = run.releases
    try:
        version = releases.current(other)
        raw = releases.read_file(other, version, "manifest.json") if version else None
        named = (json.loads(raw) if raw else {}).get("image_sha256")
    except (OSError, ValueError, PublishError) as exc:
        log.warning("Cannot read the live %s index's manifest to compare the galleries (%s)", other, exc)
        return None
    return {sha: key for key, sha in named.items()} if isinstance(named, dict) else None


def gallery_hygiene(run: ClipRun, vectors: Any, keys: Sequence[str], paths: Sequence[Path],
                    products: Sequence[str | None]) -> tuple[dict[str, Any], dict[str, str]]:
    """The gallery's hygiene report for the stage record and the manifest, and each key's sha256.

    A check that fails is recorded as ``error`` (the gate flags it) rather than failing the build."""
    sha256s = [file_sha256(path) for path in paths]
    named = dict(zip(keys, sha256s))
    similarity, skipped = similarity_checks(run)
    try:
        from inspection_refresh.clip.hygiene import check_gallery

        other = other_gallery(run)
        report = check_gallery(vectors, list(keys), sha256s, list(products), other_gallery=other,
                               by_similarity=similarity)
    except Exception as exc:  # a broken check must not pass unseen, nor stop a build
        log.warning("The %s gallery's hygiene check failed: %s: %s", run.index_type, type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}, named
    lists = {check: [list(item) for item in getattr(report, check)[:LISTED]] for check in quality_gate.GALLERY_CHECKS}
    result = {"counts": dict(report.counts()), "summary": report.summary(), "lists": lists,
              "compared_with_other_gallery": other is not None, "similarity_checked": similarity}
    if skipped:
        result["similarity_skipped"] = skipped
    log.info("%s gallery hygiene: %s%s%s", run.index_type.capitalize(), report.summary(),
             "" if other is not None else " (the other gallery's live index names no sha256s: not compared)",
             f" (near-duplicate and product-outlier checks skipped: {skipped})" if skipped else "")
    return result, named


def similarity_checks(run: ClipRun) -> tuple[bool, str | None]:
    """Whether the embedding checks run (``INSPECTION_QUALITY_SIMILARITY_CHECKS``), and why not when they don't."""
    setting = run.settings.quality_similarity_checks
    if setting == "off":
        return False, "INSPECTION_QUALITY_SIMILARITY_CHECKS=off"
    if setting == "auto":
        from inspection_refresh.clip.weights import is_random_checkpoint

        if is_random_checkpoint(run.pretrained):
            return False, "random demo/test weights make unrelated images look alike"
    return True, None


def hygiene_findings(artefact: str, hygiene: Mapping[str, Any] | None) -> list[quality_gate.Finding]:
    """The hygiene report of a stage record or a manifest as the gate's findings."""
    if not hygiene:
        return []
    if hygiene.get("error"):
        return [quality_gate.failed_check(artefact, HYGIENE_CHECK, hygiene["error"])]
    return quality_gate.gallery_findings(artefact, hygiene.get("counts") or {}, hygiene.get("lists") or {})


def quality_check(run: ClipRun, mode: str) -> quality_gate.GateDecision | None:
    """The gate's decision on the staged version (``None`` when the run publishes nothing): its gallery's
    hygiene, and whether it lost more than the margin of the live index's images."""
    saved = run.store.read_json("stage-index_save.json")["facts"]
    if saved.get("unchanged"):
        return None
    findings = hygiene_findings(run.index_type, saved.get("hygiene"))
    live = published_manifest(run)
    findings += quality_gate.index_regressions(run.index_type, (live or {}).get("count"), saved.get("count"),
                                               margins(run.settings))
    return quality_gate.decide(mode, findings, checked=[run.index_type])
