"""The promotion gate: may a candidate replace production? Pure logic on metric dicts."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GatePolicy:
    # The non-inferiority margin on golden mAP50-95: how much the fixed golden set may lose while the
    # new data gains. A fine-tune of a seed that is near-converged on golden trades a little box
    # tightness there (measured on the full demo profile, 224 px, 200 golden images: -0.026 at
    # lr0 0.01 and -0.010 at lr0 0.002, with golden mAP50 within 0.006 and every class's recall
    # held), so a zero margin rejected a model that took the new line from 0.000 to 0.995 mAP50.
    # The per-class recall check (max_recall_drop) still stops a class that really got worse.
    golden_tolerance: float = 0.03
    min_new_data_gain: float = 0.0
    # No class's golden recall, and no source device's new-data recall, may drop by more than this.
    max_recall_drop: float = 0.05
    # The shipped ONNX artifact and the .pt it came from must agree on mAP50-95 within this.
    artifact_tolerance: float = 0.02
    # Device slices with fewer labelled instances than this are reported but not gated (noise).
    min_slice_instances: int = 20


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
    _check_recall_slices(decision, candidate, production, policy)
    _check_artifact_agreement(decision, candidate, policy)
    if decision.passed:
        decision.reasons.append("candidate beats production on new data and holds the golden set")
    return decision


def _recall_drops(cand: dict, prod: dict, max_drop: float, min_instances: int = 0) -> dict[str, dict]:
    """Per key of two ``{name: {"recall": .., "instances": ..}}`` maps, the recall comparison."""
    out = {}
    for name in sorted(set(cand) & set(prod)):
        c, p = cand[name].get("recall"), prod[name].get("recall")
        if c is None or p is None:
            continue
        instances = cand[name].get("instances")
        gated = instances is None or instances >= min_instances
        out[name] = {"candidate": c, "production": p, "threshold": p - max_drop,
                     "passed": (c >= p - max_drop) or not gated, "gated": gated}
    return out


def _check_recall_slices(decision: GateDecision, candidate: dict, production: dict, policy: GatePolicy) -> None:
    """The bias check: a better average must not hide a class or a device that got worse."""
    per_class = _recall_drops((candidate.get("golden") or {}).get("per_class") or {},
                              (production.get("golden") or {}).get("per_class") or {}, policy.max_recall_drop)
    if per_class:
        decision.checks["golden_class_recall"] = per_class
    _fail_drops(decision, per_class, "golden recall of class", policy.max_recall_drop)
    cand_dev = {k.removeprefix("device:"): v for k, v in candidate.items() if k.startswith("device:")}
    prod_dev = {k.removeprefix("device:"): v for k, v in production.items() if k.startswith("device:")}
    per_device = _recall_drops(cand_dev, prod_dev, policy.max_recall_drop, policy.min_slice_instances)
    if per_device:
        decision.checks["device_recall"] = per_device
    _fail_drops(decision, per_device, "new-data recall on device", policy.max_recall_drop)


def _fail_drops(decision: GateDecision, checks: dict[str, dict], what: str, max_drop: float) -> None:
    for name, check in checks.items():
        if not check["passed"]:
            decision.passed = False
            decision.reasons.append(f"{what} {name!r} fell from {check['production']:.3f} to "
                                    f"{check['candidate']:.3f} (more than {max_drop:.3f})")


def _check_artifact_agreement(decision: GateDecision, candidate: dict, policy: GatePolicy) -> None:
    """Metrics of the exported artifact (``<set>@onnx``) must match the .pt's: what ships is what was gated."""
    for key, metrics in candidate.items():
        if not key.endswith("@onnx"):
            continue
        base = candidate.get(key.removesuffix("@onnx")) or {}
        if base.get("map50_95") is None or metrics.get("map50_95") is None:
            continue
        diff = abs(metrics["map50_95"] - base["map50_95"])
        ok = diff <= policy.artifact_tolerance
        decision.checks[f"artifact_agreement:{key}"] = {
            "pt": base["map50_95"], "onnx": metrics["map50_95"], "difference": diff,
            "threshold": policy.artifact_tolerance, "passed": ok}
        if not ok:
            decision.passed = False
            decision.reasons.append(
                f"exported ONNX mAP50-95 {metrics['map50_95']:.3f} differs from the .pt's {base['map50_95']:.3f} "
                f"on {key.removesuffix('@onnx')} by {diff:.3f} (tolerance {policy.artifact_tolerance:.3f})")
