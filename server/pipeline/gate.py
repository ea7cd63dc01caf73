"""The promotion gate: may a candidate replace production? Pure logic on metric dicts."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GatePolicy:
    golden_tolerance: float = 0.0
    min_new_data_gain: float = 0.0


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "checks": self.checks}


def decide(candidate: dict, production: dict | None, policy: GatePolicy) -> GateDecision:
    """``candidate``/``production``: {eval set name: {"map50": .., "map50_95": ..}}.

    Golden mAP50-95 must not drop by more than the tolerance, and the candidate must be
    better on the new-data split. With no production model the candidate passes.
    """
    if production is None:
        return GateDecision(True, ["no production model yet: first model is accepted"])
    decision = GateDecision(True)

    cand_golden = (candidate.get("golden") or {}).get("map50_95")
    prod_golden = (production.get("golden") or {}).get("map50_95")
    if cand_golden is None or prod_golden is None:
        decision.passed = False
        decision.reasons.append("golden-set metrics missing for candidate or production")
    else:
        floor = prod_golden - policy.golden_tolerance
        ok = cand_golden >= floor
        decision.checks["golden_map50_95"] = {
            "candidate": cand_golden, "production": prod_golden, "threshold": floor, "passed": ok,
        }
        if not ok:
            decision.passed = False
            decision.reasons.append(
                f"golden mAP50-95 {cand_golden:.3f} is below production {prod_golden:.3f}"
                f" - tolerance {policy.golden_tolerance:.3f}"
            )

    cand_new = (candidate.get("new_data") or {}).get("map50_95")
    prod_new = (production.get("new_data") or {}).get("map50_95")
    if cand_new is None or prod_new is None:
        decision.passed = False
        decision.reasons.append("new-data split metrics missing for candidate or production")
    else:
        needed = prod_new + policy.min_new_data_gain
        ok = cand_new > needed if policy.min_new_data_gain == 0 else cand_new >= needed
        decision.checks["new_data_map50_95"] = {
            "candidate": cand_new, "production": prod_new, "threshold": needed, "passed": ok,
        }
        if not ok:
            decision.passed = False
            decision.reasons.append(
                f"new-data mAP50-95 {cand_new:.3f} is not better than production {prod_new:.3f}"
            )
    if decision.passed:
        decision.reasons.append("candidate beats production on new data and holds the golden set")
    return decision
