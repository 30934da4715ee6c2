"""The quality gate's decisions and regression checks (pure: no Airflow, no storage)."""

from __future__ import annotations

import pytest
from inspection_refresh import quality_gate as gate
from inspection_refresh.config import QUALITY_GATE_MODES, Settings

LIVE = {"auroc": 0.95, "tau": {"image": 2.0, "pixel": 3.0}}


def finding(artefact: str = "TEX01", check: str = "suspected_defects") -> gate.Finding:
    return gate.Finding(artefact, check, f"{check} of {artefact}", ("a.png",), 1)


def test_the_modes_decide_publish_ask_or_block():
    flagged = [finding("TEX01"), finding("TEX01", "tau_shift")]
    assert gate.decide("off", flagged).action == gate.PUBLISH and gate.decide("off", flagged).reasons == []
    warn = gate.decide("warn", flagged, checked=["TEX01", "BRKT02"])
    assert warn.action == gate.PUBLISH and warn.reasons == ["TEX01: suspected_defects of TEX01",
                                                          "TEX01: tau_shift of TEX01"]
    assert gate.decide("approve", flagged).action == gate.ASK
    block = gate.decide("BLOCK", flagged, checked=["TEX01", "BRKT02"])
    assert block.action == gate.BLOCK and list(block.blocked) == ["TEX01"] and not block.all_blocked
    assert block.blocked["TEX01"] == "blocked by the quality gate: suspected_defects of TEX01; tau_shift of TEX01"
    assert gate.decide("block", flagged, checked=["TEX01"]).all_blocked
    for mode in gate.MODES:  # nothing flagged: every mode publishes
        assert gate.decide(mode, [], checked=["TEX01"]).action == gate.PUBLISH
    with pytest.raises(ValueError, match="'strict' is not one of off, warn, approve, block"):
        gate.decide("strict", flagged)


def test_a_decision_survives_its_json_round_trip():
    decision = gate.decide("block", [finding()], checked=["TEX01", "X"])
    again = gate.GateDecision.from_dict(decision.to_dict())
    assert again == decision and again.flagged == ["TEX01"]


@pytest.mark.parametrize(("new", "checks"), [
    ({"auroc": 0.91, "tau": {"image": 2.0}}, []),  # 0.04 below: within the margin
    ({"auroc": 0.89, "tau": {"image": 2.0}}, ["auroc_drop"]),
    ({"auroc": 0.95, "tau": {"image": 3.9}}, []),
    ({"auroc": 0.95, "tau": {"image": 4.1}}, ["tau_shift"]),
    ({"auroc": 0.95, "tau": {"image": 0.99}}, ["tau_shift"]),
    ({"auroc": None, "tau": {"image": 0.5}}, ["tau_shift"]),  # no labelled defects: AUROC not compared
    ({"auroc": 0.5, "tau": {"image": 1.1}}, ["auroc_drop"]),
])
def test_bank_regressions_against_the_live_bank(new, checks):
    found = gate.bank_regressions("TEX01", LIVE, new)
    assert [f.check for f in found] == checks
    assert gate.bank_regressions("TEX01", None, new) == []  # nothing live: nothing to regress from


def test_margins_are_settings():
    strict = gate.Margins(auroc_drop=0.01, tau_factor=1.2, images_lost=0.05)
    assert [f.check for f in gate.bank_regressions("P", LIVE, {"auroc": 0.93, "tau": {"image": 2.5}}, strict)] == [
        "auroc_drop", "tau_shift"]
    assert gate.index_regressions("normal", 100, 94, strict)[0].message.startswith(
        "6 of the live index's 100 images are gone (6%")
    with pytest.raises(ValueError, match="margins out of range"):
        gate.Margins(tau_factor=0.5)


def test_a_clip_index_losing_more_than_a_fifth_of_its_images_is_flagged():
    assert gate.index_regressions("normal", 100, 80) == []
    lost = gate.index_regressions("normal", 100, 79)
    assert [(f.check, f.count) for f in lost] == [("images_lost", 21)]
    assert gate.index_regressions("normal", None, 3) == [] and gate.index_regressions("normal", 10, 30) == []


def test_suspected_defects_name_the_highest_first():
    quality = {"method": "m", "tau": 1.5, "images_scored": 60, "seconds": 1.0, "suspected_defects": [
        {"file": f"d{i}.png", "score": 3.0 - i * 0.1, "score_over_tau": 2.0 - i * 0.1} for i in range(7)]}
    [found] = gate.suspected_defects("TEX01", quality)
    assert found.files[:2] == ("d0.png", "d1.png") and found.count == 7
    assert found.message.startswith("7 normal images of 60 score 1.05x tau or more out of sample")
    assert "d0.png (3)" in found.message and "and 2 more" in found.message and "d6.png" not in found.message
    assert gate.suspected_defects("TEX01", {**quality, "suspected_defects": []}) == []
    assert gate.suspected_defects("TEX01", None) == []


def test_images_just_above_tau_are_reported_but_do_not_flag_the_bank():
    """Clean builds list one or two images at 1.00-1.04 x tau: the gate flags from the suspect ratio up."""
    quality = {"tau": 1.0, "images_scored": 60, "suspected_defects": [
        {"file": "d.png", "score": 1.3, "score_over_tau": 1.3}, {"file": "edge.png", "score": 1.03, "score_over_tau": 1.03}]}
    [found] = gate.suspected_defects("TEX01", quality)
    assert found.files == ("d.png",) and found.count == 1
    just_above = {**quality, "suspected_defects": quality["suspected_defects"][1:]}
    assert gate.suspected_defects("TEX01", just_above) == []
    assert gate.suspected_defects("TEX01", just_above, gate.Margins(suspect_ratio=1.0))[0].files == ("edge.png",)


def test_gallery_findings_one_per_check_that_found_something():
    counts = {"exact_duplicates": 1, "near_duplicates": 1, "in_both_galleries": 1, "product_outliers": 0}
    lists = {"exact_duplicates": [["a.jpg", "b.jpg"]], "near_duplicates": [["c.jpg", "d.jpg", 0.981]],
             "in_both_galleries": [["e.jpg", "defect/e.jpg"]], "product_outliers": []}
    found = gate.gallery_findings("normal", counts, lists)
    assert [(f.check, f.files) for f in found] == [("exact_duplicates", ("a.jpg", "b.jpg")),
                                                   ("near_duplicates", ("c.jpg",)), ("in_both_galleries", ("e.jpg",))]
    assert found[1].message == "1 near-duplicate pair: c.jpg ≈ d.jpg (cosine 0.981)"
    assert found[2].message == "1 image also in the other gallery: e.jpg (there: defect/e.jpg)"
    section = gate.markdown(gate.decide("approve", found))
    assert section[0] == "**Quality gate — 3 finding(s), approval required (approve):**" and len(section) == 4


def test_the_settings_modes_are_the_gates():
    assert QUALITY_GATE_MODES == gate.MODES
    assert Settings.quality_gate == "approve"


def test_a_bad_gate_setting_names_the_modes(monkeypatch):
    monkeypatch.setenv("INSPECTION_QUALITY_GATE", "strict")
    with pytest.raises(ValueError, match="INSPECTION_QUALITY_GATE is 'strict'; use one of off, warn, approve, block"):
        Settings.from_env()
