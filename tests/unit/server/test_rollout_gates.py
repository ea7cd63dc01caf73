"""A wave's gates as pure functions: each gate's value against its threshold, fail-fast on quality,
waiting until every device has enough evidence, and the switch phase's install accounting."""

from __future__ import annotations

import pytest

from server.rollouts.gates import DeviceEvidence, ShadowWindow, shadow_verdict, switch_verdict, totals
from server.rollouts.spec import GateConfig

CONFIG = GateConfig(min_frames=100, min_shadow_seconds=30, min_agreement=0.9, max_accuracy_drop=0.02,
                    max_latency_p99_ms=50, max_errors=0, max_install_failure_rate=0.0)


def _device(name: str, *, frames: int = 120, agreement: float = 0.97, seconds: float = 60.0, corrected: int = 0,
            active_acc: float | None = None, candidate_acc: float | None = None, latency: float = 20.0,
            errors: int = 0, failed: bool = False, shadowing: bool = True) -> DeviceEvidence:
    window = ShadowWindow(frames=frames, agreement=0.5, confident_agreement=agreement, corrected_frames=corrected,
                          active_accuracy=active_acc, candidate_accuracy=candidate_acc,
                          candidate_latency_ms_p99=latency, errors=errors)
    return DeviceEvidence(name, failed=failed, shadowing=shadowing, shadow=totals([window]), shadow_seconds=seconds)


def _gate(verdict, name: str):
    return next(g for g in verdict.gates if g.name == name)


def test_totals_weight_windows_by_frames_and_pool_corrected_frames():
    t = totals([
        ShadowWindow(frames=100, agreement=1.0, confident_agreement=0.9, corrected_frames=10, active_accuracy=0.8,
                     candidate_accuracy=0.9, candidate_latency_ms_p99=10.0),
        ShadowWindow(frames=300, agreement=0.6, corrected_frames=30, active_accuracy=0.5, candidate_accuracy=0.4,
                     candidate_latency_ms_p99=30.0, errors=2),
        ShadowWindow(frames=0, agreement=None),  # an empty window counts as a window, nothing else
    ])
    assert t.windows == 3 and t.frames == 400 and t.errors == 2
    assert t.agreement == pytest.approx((100 * 1.0 + 300 * 0.6) / 400)
    assert t.confident_agreement == pytest.approx(0.9)  # only the window that measured it
    assert t.corrected_frames == 40
    assert t.active_accuracy == pytest.approx((8 + 15) / 40)
    assert t.candidate_accuracy == pytest.approx((9 + 12) / 40)
    assert t.candidate_latency_ms_p99 == pytest.approx((100 * 10 + 300 * 30) / 400)


def test_a_good_wave_passes_with_every_gate_reported():
    verdict = shadow_verdict([_device("a"), _device("b", agreement=0.92)], CONFIG)
    assert verdict.outcome == "pass", verdict.reason
    assert [g.name for g in verdict.gates] == ["min_frames", "min_shadow_seconds", "min_agreement",
                                               "max_accuracy_drop", "max_latency_p99_ms", "max_errors",
                                               "max_install_failure_rate"]
    agreement = _gate(verdict, "min_agreement")
    assert agreement.value == pytest.approx(0.92) and agreement.threshold == 0.9 and agreement.passed
    assert "worst: b" in agreement.detail
    assert _gate(verdict, "max_accuracy_drop").passed is None  # no corrected frames: not measured


def test_low_agreement_on_a_judged_device_fails_at_once_even_while_others_wait():
    verdict = shadow_verdict([_device("good", frames=10), _device("bad", agreement=0.4)], CONFIG)
    assert verdict.outcome == "fail"
    assert "min_agreement: 0.4 against 0.9 (worst: bad)" in verdict.reason
    assert [g.name for g in verdict.failed_gates()] == ["min_frames", "min_agreement"]


def test_agreement_is_not_judged_before_min_frames():
    verdict = shadow_verdict([_device("early", frames=40, agreement=0.1)], CONFIG)
    assert verdict.outcome == "wait"
    assert _gate(verdict, "min_agreement").passed is None
    assert "min_frames: 40 against 100" in verdict.reason


def test_accuracy_drop_is_pooled_over_corrected_frames():
    # 20 corrected frames on each device: active 0.9 / 0.9, candidate 0.8 / 0.95 -> drop 0.025 > 0.02
    worse = shadow_verdict([_device("a", corrected=20, active_acc=0.9, candidate_acc=0.8),
                            _device("b", corrected=20, active_acc=0.9, candidate_acc=0.95)], CONFIG)
    assert worse.outcome == "fail"
    assert _gate(worse, "max_accuracy_drop").value == pytest.approx(0.025)
    better = shadow_verdict([_device("a", corrected=20, active_acc=0.5, candidate_acc=0.9)], CONFIG)
    assert better.outcome == "pass" and _gate(better, "max_accuracy_drop").value == pytest.approx(-0.4)


@pytest.mark.parametrize(("field", "value", "gate"), [
    ("latency", 80.0, "max_latency_p99_ms"),
    ("errors", 1, "max_errors"),
])
def test_latency_over_budget_or_any_error_fails(field, value, gate):
    verdict = shadow_verdict([_device("a"), _device("b", **{field: value})], CONFIG)
    assert verdict.outcome == "fail"
    assert [g.name for g in verdict.failed_gates()] == [gate]


def test_no_latency_budget_shows_the_value_and_passes():
    verdict = shadow_verdict([_device("a", latency=900.0)], CONFIG.model_copy(update={"max_latency_p99_ms": None}))
    latency = _gate(verdict, "max_latency_p99_ms")
    assert verdict.outcome == "pass" and latency.value == 900.0 and latency.threshold is None and latency.passed


def test_waits_for_shadow_time_and_for_every_device_to_hold_in_shadow():
    young = shadow_verdict([_device("a", seconds=5)], CONFIG)
    assert young.outcome == "wait" and "min_shadow_seconds: 5 against 30" in young.reason
    installing = shadow_verdict([_device("a"), _device("b", frames=0, agreement=None, seconds=0,
                                                       shadowing=False)], CONFIG)
    assert installing.outcome == "wait" and "not shadowing yet: b" in installing.reason


def test_install_failures_count_against_the_rate_and_failed_devices_are_not_judged():
    config = CONFIG.model_copy(update={"max_install_failure_rate": 0.5})
    within = shadow_verdict([_device("a"), _device("broken", frames=0, failed=True)], config)
    assert within.outcome == "pass"
    assert _gate(within, "max_install_failure_rate").value == 0.5
    over = shadow_verdict([_device("a"), _device("x", failed=True), _device("y", failed=True)], config)
    assert over.outcome == "fail" and "2 of 3 failed: x, y" in over.reason
    everyone = shadow_verdict([_device("x", failed=True)], CONFIG.model_copy(update={"max_install_failure_rate": 1}))
    assert everyone.outcome == "fail" and "no device left" in everyone.reason


def test_an_empty_wave_passes():
    assert shadow_verdict([], CONFIG).outcome == "pass"
    assert switch_verdict([], CONFIG).outcome == "pass"


def test_switch_phase_waits_for_every_device_then_needs_one_running_the_candidate():
    running = DeviceEvidence("a", running_candidate=True, settled=True)
    switching = DeviceEvidence("b")
    assert switch_verdict([running, switching], CONFIG).outcome == "wait"
    assert switch_verdict([running, DeviceEvidence("b", running_candidate=True, settled=True)],
                          CONFIG).outcome == "pass"
    failed = DeviceEvidence("b", failed=True, settled=True)
    assert switch_verdict([running, failed], CONFIG).outcome == "fail"
    lenient = CONFIG.model_copy(update={"max_install_failure_rate": 1.0})
    assert switch_verdict([running, failed], lenient).outcome == "pass"
    nobody = switch_verdict([failed], lenient)
    assert nobody.outcome == "fail" and "no device" in nobody.reason


def test_only_agreement_where_the_active_model_is_confident_is_gated():
    # A retrained candidate finding defects the active model misses: the symmetric agreement is low,
    # but it contradicts nothing the active model was sure of; corrected frames show it is better.
    window = ShadowWindow(frames=150, agreement=0.1, confident_agreement=None, corrected_frames=40,
                          active_accuracy=0.2, candidate_accuracy=0.7, candidate_latency_ms_p99=20.0)
    verdict = shadow_verdict([DeviceEvidence("a", shadowing=True, shadow=totals([window]), shadow_seconds=60)],
                             CONFIG)
    assert verdict.outcome == "pass", verdict.reason
    agreement = _gate(verdict, "min_agreement")
    assert agreement.value is None and agreement.passed is None
    assert agreement.detail == "no confident box of the active model yet"
