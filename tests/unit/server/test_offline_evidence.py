"""The rollout view carries the version's offline gate: what the real gate decided, flattened."""

from __future__ import annotations

from server.db.models import ModelVersion
from server.pipeline.gate import GatePolicy, decide
from server.rollouts.api import offline_evidence


def _metrics(golden, new, line_b_recall, instances=40):
    return {"golden": {"map50": golden + 0.1, "map50_95": golden, "per_class": {"dent": {"recall": golden}}},
            "new_data": {"map50": new + 0.1, "map50_95": new},
            "device:cam-b": {"recall": line_b_recall, "instances": instances}}


def test_the_gate_s_checks_travel_with_the_rollout():
    gate = decide(_metrics(0.74, 0.61, 0.91), _metrics(0.58, 0.02, 0.06), GatePolicy()).as_dict()
    evidence = offline_evidence(ModelVersion(version=2, parent_version=1, gate=gate))
    assert evidence["passed"] is True and evidence["parent_version"] == 1
    checks = {c["name"]: c for c in evidence["checks"]}
    assert set(checks) == {"golden", "new_data", "golden class dent", "device cam-b"}
    assert checks["device cam-b"] == {"name": "device cam-b", "metric": "recall", "candidate": 0.91,
                                      "production": 0.06, "threshold": 0.06 - 0.05, "passed": True}
    assert checks["golden"]["candidate"] == 0.74 and checks["golden"]["production"] == 0.58


def test_a_failed_slice_shows_as_failed_and_an_ungated_model_has_no_checks():
    gate = decide(_metrics(0.74, 0.61, 0.30), _metrics(0.58, 0.02, 0.90), GatePolicy()).as_dict()
    evidence = offline_evidence(ModelVersion(version=3, parent_version=2, gate=gate))
    assert evidence["passed"] is False and any("cam-b" in r for r in evidence["reasons"])
    assert [c["passed"] for c in evidence["checks"] if c["name"] == "device cam-b"] == [False]
    seed = offline_evidence(ModelVersion(version=1, gate={}))
    assert seed == {"parent_version": None, "passed": None, "reasons": [], "checks": []}
    assert offline_evidence(None) is None
