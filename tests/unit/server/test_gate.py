"""The promotion gate on candidate vs production metrics."""

from __future__ import annotations

import pytest

from server.pipeline.gate import GatePolicy, decide


def _m(golden: float | None, new: float | None) -> dict:
    out: dict = {}
    if golden is not None:
        out["golden"] = {"map50": golden + 0.1, "map50_95": golden}
    if new is not None:
        out["new_data"] = {"map50": new + 0.1, "map50_95": new}
    return out


def test_no_production_model_passes() -> None:
    decision = decide(_m(0.1, 0.1), None, GatePolicy())
    assert decision.passed
    assert "no production" in decision.reasons[0]
    assert decision.checks == {}


def test_candidate_holding_golden_and_improving_new_data_passes() -> None:
    decision = decide(_m(0.55, 0.62), _m(0.50, 0.40), GatePolicy())
    assert decision.passed
    assert decision.checks["golden_map50_95"] == {"candidate": 0.55, "production": 0.50,
                                                  "threshold": pytest.approx(0.47), "passed": True}
    assert decision.checks["new_data_map50_95"]["passed"] is True
    assert decision.checks["new_data_map50_95"]["threshold"] == pytest.approx(0.40)
    assert any("beats production" in r for r in decision.reasons)
    assert decision.as_dict()["passed"] is True


def test_golden_drop_beyond_tolerance_fails() -> None:
    decision = decide(_m(0.47, 0.9), _m(0.50, 0.4), GatePolicy(golden_tolerance=0.02))
    assert not decision.passed
    assert decision.checks["golden_map50_95"]["passed"] is False
    assert decision.checks["golden_map50_95"]["threshold"] == pytest.approx(0.48)
    assert decision.checks["new_data_map50_95"]["passed"] is True
    assert any("golden mAP50-95 0.470 is below production 0.500" in r for r in decision.reasons)
    assert not any("beats production" in r for r in decision.reasons)


def test_golden_drop_with_zero_tolerance_fails() -> None:
    assert not decide(_m(0.4999, 0.9), _m(0.50, 0.4), GatePolicy(golden_tolerance=0.0)).passed


def test_the_default_margin_passes_the_full_profile_fine_tune_and_stops_a_real_loss() -> None:
    # Measured on a fresh machine's full-profile demo: golden 0.915 -> 0.889 while the new line went
    # from 0.000 to 0.902 (mAP50-95), every class's recall held. The default margin ships it ...
    measured = decide(_m(0.8885, 0.902), _m(0.9152, 0.00005), GatePolicy())
    assert measured.passed, measured.reasons
    # ... and a golden loss past the margin still stops a model however good it is on new data.
    worse = decide(_m(0.88, 0.99), _m(0.9152, 0.00005), GatePolicy())
    assert not worse.passed and "below production 0.915 - tolerance 0.030" in worse.reasons[0]


def test_tolerance_allows_a_small_golden_drop() -> None:
    decision = decide(_m(0.49, 0.6), _m(0.50, 0.4), GatePolicy(golden_tolerance=0.02))
    assert decision.passed
    assert decision.checks["golden_map50_95"]["passed"] is True


def test_equal_golden_is_allowed() -> None:
    assert decide(_m(0.5, 0.6), _m(0.5, 0.4), GatePolicy()).passed


def test_no_gain_on_new_data_fails() -> None:
    decision = decide(_m(0.6, 0.40), _m(0.5, 0.40), GatePolicy())
    assert not decision.passed
    assert decision.checks["new_data_map50_95"]["passed"] is False
    assert any("not better than production" in r for r in decision.reasons)
    assert not decide(_m(0.6, 0.39), _m(0.5, 0.40), GatePolicy()).passed


def test_min_gain_is_required_when_set() -> None:
    policy = GatePolicy(min_new_data_gain=0.05)
    assert not decide(_m(0.5, 0.44), _m(0.5, 0.40), policy).passed
    assert decide(_m(0.5, 0.46), _m(0.5, 0.40), policy).passed
    assert decide(_m(0.5, 0.45), _m(0.5, 0.40), policy).checks["new_data_map50_95"]["threshold"] == pytest.approx(0.45)


@pytest.mark.parametrize(
    ("candidate", "production", "missing"),
    [
        (_m(None, 0.6), _m(0.5, 0.4), "golden"),
        (_m(0.5, 0.6), _m(None, 0.4), "golden"),
        (_m(0.5, None), _m(0.5, 0.4), "new-data"),
        (_m(0.5, 0.6), _m(0.5, None), "new-data"),
        ({}, {}, "golden"),
        ({"golden": {"map50": 0.9}, "new_data": {"map50": 0.9}}, _m(0.5, 0.4), "golden"),
        ({"golden": None, "new_data": None}, _m(0.5, 0.4), "new-data"),
    ],
)
def test_missing_metrics_fail_closed(candidate: dict, production: dict, missing: str) -> None:
    decision = decide(candidate, production, GatePolicy())
    assert not decision.passed
    assert any(missing in r and "missing" in r for r in decision.reasons)


def test_nan_metrics_fail_closed() -> None:
    nan = float("nan")
    assert not decide(_m(nan, 0.6), _m(0.5, 0.4), GatePolicy()).passed
    assert not decide(_m(0.5, 0.6), _m(nan, 0.4), GatePolicy()).passed
    assert not decide(_m(0.5, nan), _m(0.5, 0.4), GatePolicy()).passed


def test_both_failures_are_reported() -> None:
    decision = decide(_m(0.3, 0.3), _m(0.5, 0.4), GatePolicy())
    assert not decision.passed
    assert len(decision.reasons) == 2


def _with_classes(metrics: dict, recalls: dict[str, float]) -> dict:
    metrics["golden"]["per_class"] = {name: {"recall": r, "map50_95": 0.5} for name, r in recalls.items()}
    return metrics


def test_a_class_whose_recall_collapses_fails_even_when_the_average_improves() -> None:
    cand = _with_classes(_m(0.60, 0.9), {"scratch": 0.95, "dent": 0.95, "stain": 0.70})
    prod = _with_classes(_m(0.50, 0.4), {"scratch": 0.80, "dent": 0.80, "stain": 0.90})
    decision = decide(cand, prod, GatePolicy(max_recall_drop=0.05))
    assert not decision.passed
    assert decision.checks["golden_class_recall"]["stain"]["passed"] is False
    assert decision.checks["golden_class_recall"]["scratch"]["passed"] is True
    assert any("class 'stain' fell from 0.900 to 0.700" in r for r in decision.reasons)


def test_a_small_class_recall_drop_within_delta_passes() -> None:
    cand = _with_classes(_m(0.60, 0.9), {"stain": 0.87})
    prod = _with_classes(_m(0.50, 0.4), {"stain": 0.90})
    assert decide(cand, prod, GatePolicy(max_recall_drop=0.05)).passed


def test_a_device_slice_that_got_worse_fails_but_tiny_slices_are_not_gated() -> None:
    cand, prod = _m(0.60, 0.9), _m(0.50, 0.4)
    cand["device:cam-1"] = {"recall": 0.5, "instances": 100}
    prod["device:cam-1"] = {"recall": 0.9, "instances": 100}
    cand["device:cam-2"] = {"recall": 0.1, "instances": 3}
    prod["device:cam-2"] = {"recall": 0.9, "instances": 3}
    decision = decide(cand, prod, GatePolicy(min_slice_instances=20))
    assert not decision.passed
    assert decision.checks["device_recall"]["cam-1"]["passed"] is False
    assert decision.checks["device_recall"]["cam-2"] == {"candidate": 0.1, "production": 0.9, "threshold": 0.85,
                                                         "passed": True, "gated": False}
    assert sum("device" in r for r in decision.reasons) == 1


def test_exported_artifact_must_agree_with_the_pt() -> None:
    cand, prod = _m(0.60, 0.9), _m(0.50, 0.4)
    cand["golden@onnx"] = {"map50_95": 0.59}
    assert decide(cand, prod, GatePolicy(artifact_tolerance=0.02)).passed
    cand["golden@onnx"] = {"map50_95": 0.50}
    decision = decide(cand, prod, GatePolicy(artifact_tolerance=0.02))
    assert not decision.passed
    assert decision.checks["artifact_agreement:golden@onnx"]["difference"] == pytest.approx(0.10)
    assert any("exported ONNX mAP50-95 0.500 differs" in r for r in decision.reasons)
