"""A wave's gates as pure functions: the sequential accuracy decision on pooled paired outcomes,
the agreement guard only where the active model is shown right, a latency budget from the active
model's own p99, waiting until every device has enough frames, pausing when the evidence never
decides, and the switch phase's install accounting."""

from __future__ import annotations

import pytest

from server.rollouts.gates import (
    DeviceEvidence,
    ShadowWindow,
    latency_budget,
    shadow_verdict,
    switch_verdict,
    totals,
)
from server.rollouts.spec import GateConfig

CONFIG = GateConfig(min_frames=100, min_shadow_seconds=30, max_shadow_seconds=600, min_agreement=0.9,
                    max_errors=0, max_install_failure_rate=0.0)


def _window(*, frames: int = 120, agreement: float | None = 0.97, known: int = 0, b: int = 0, c: int = 0,
            active_right: int | None = None, latency: float = 20.0, active_latency: float = 20.0,
            errors: int = 0, at: float = 0.0) -> ShadowWindow:
    """One window; ``active_right`` of the ``known`` frames the active model got right (default: all
    but the candidate-only ones), b/c the discordant pairs."""
    active_right = known - b if active_right is None else active_right
    return ShadowWindow(
        frames=frames, agreement=0.5, confident_agreement=agreement, corrected_frames=known,
        active_accuracy=active_right / known if known else None,
        candidate_accuracy=(active_right - c + b) / known if known else None,
        candidate_only_correct=b, active_only_correct=c, active_latency_ms_p99=active_latency,
        candidate_latency_ms_p99=latency, errors=errors, at=at)


def _device(name: str, *windows: ShadowWindow, seconds: float = 60.0, failed: bool = False,
            shadowing: bool = True, **window) -> DeviceEvidence:
    return DeviceEvidence(name, failed=failed, shadowing=shadowing, shadow=totals(windows or [_window(**window)]),
                          shadow_seconds=seconds)


def _gate(verdict, name: str):
    return next(g for g in verdict.gates if g.name == name)


def test_totals_weight_windows_by_frames_and_keep_the_paired_windows_in_arrival_order():
    t = totals([
        _window(frames=300, agreement=None, known=30, b=0, c=6, active_right=15, latency=30.0, errors=2, at=2.0),
        _window(frames=100, agreement=0.9, known=10, b=2, c=1, active_right=8, latency=10.0, at=1.0),
        ShadowWindow(frames=0, agreement=None, at=3.0),  # an empty window counts as a window, nothing else
    ])
    assert t.windows == 3 and t.frames == 400 and t.errors == 2
    assert t.confident_agreement == pytest.approx(0.9)  # only the window that measured it
    assert t.corrected_frames == 40
    assert t.active_accuracy == pytest.approx((8 + 15) / 40)
    assert t.candidate_accuracy == pytest.approx((9 + 9) / 40)
    assert t.candidate_latency_ms_p99 == pytest.approx((100 * 10 + 300 * 30) / 400)
    assert [at for at, _ in t.paired] == [1.0, 2.0]  # the empty window has no paired outcomes
    assert (t.paired_total.known, t.paired_total.candidate_only, t.paired_total.active_only) == (40, 2, 7)


def test_a_clearly_better_candidate_passes_by_superiority_with_its_evidence_shown():
    # The active model is wrong on this line (right on 2 of 40): it guards nothing by agreement, so
    # the candidate disagreeing with it on most of its confident boxes is no evidence against it.
    verdict = shadow_verdict([_device("a", known=40, b=30, c=1, active_right=2, agreement=0.2)], CONFIG)
    assert verdict.outcome == "pass", verdict.reason
    assert [g.name for g in verdict.gates] == ["min_frames", "min_shadow_seconds", "paired_accuracy",
                                               "min_agreement", "max_latency_p99_ms", "max_errors",
                                               "max_install_failure_rate"]
    accuracy = _gate(verdict, "paired_accuracy")
    assert accuracy.passed and accuracy.evidence["test"] == "superiority"
    assert accuracy.evidence["candidate_only"] == 30 and accuracy.evidence["active_only"] == 1
    assert accuracy.value <= accuracy.threshold
    agreement = _gate(verdict, "min_agreement")
    assert agreement.passed is None and "not applied on a: active model right on 2/40" in agreement.detail
    assert "superiority" in verdict.reason


def test_a_significantly_worse_candidate_fails_and_a_few_frames_of_it_do_not():
    few = shadow_verdict([_device("a", known=20, b=0, c=4, active_right=4)], CONFIG)
    assert few.outcome == "wait" and _gate(few, "paired_accuracy").passed is None
    many = shadow_verdict([_device("a", known=80, b=0, c=12, active_right=12)], CONFIG)
    assert many.outcome == "fail"
    assert _gate(many, "paired_accuracy").evidence["test"] == "inferiority"
    assert "paired_accuracy" in many.reason


def test_an_equally_good_candidate_passes_by_non_inferiority_once_enough_frames_are_known():
    early = shadow_verdict([_device("a", known=40, b=0, c=0, active_right=20)], CONFIG)
    assert early.outcome == "wait" and "collecting evidence" in early.reason
    later = shadow_verdict([_device("a", known=320, b=1, c=1, active_right=160)], CONFIG)
    assert later.outcome == "pass", later.reason
    accuracy = _gate(later, "paired_accuracy")
    assert accuracy.evidence["test"] == "non-inferiority" and accuracy.value < CONFIG.margin


def test_the_waves_devices_are_pooled_in_the_order_they_reported():
    # Neither device has enough known frames for the first look alone; together they do.
    alone = shadow_verdict([_device("a", known=12, b=9, c=0, active_right=1, at=1.0)], CONFIG)
    assert alone.outcome == "wait"
    pooled = shadow_verdict([_device("a", known=12, b=9, c=0, active_right=1, at=1.0),
                             _device("b", known=12, b=8, c=0, active_right=1, at=2.0)], CONFIG)
    assert pooled.outcome == "pass" and _gate(pooled, "paired_accuracy").evidence["known"] == 24


def test_no_decision_until_the_time_limit_then_pause_with_not_enough_evidence_or_pass_on_the_offline_gate():
    unlabeled = dict(known=0, b=0, c=0)
    assert shadow_verdict([_device("a", seconds=300, **unlabeled)], CONFIG).outcome == "wait"
    late = shadow_verdict([_device("a", seconds=600, **unlabeled)], CONFIG)
    assert late.outcome == "undecided" and "not enough evidence" in late.reason
    carried = shadow_verdict([_device("a", seconds=600, **unlabeled)],
                             CONFIG.model_copy(update={"on_no_evidence": "pass"}))
    assert carried.outcome == "pass" and "offline gate" in carried.reason


def test_the_agreement_guard_applies_where_the_active_model_is_shown_right():
    # Right on 98 of 100 known frames: the lower bound clears 0.8, so disagreeing with it counts.
    trusted = shadow_verdict([_device("a", known=100, b=0, c=1, active_right=98, agreement=0.4)], CONFIG)
    assert trusted.outcome == "fail" and "min_agreement: 0.4 against 0.9" in trusted.reason
    # No labels at all: the active model is not shown right, the guard is not applied.
    unknown = shadow_verdict([_device("a", agreement=0.4)], CONFIG)
    assert _gate(unknown, "min_agreement").passed is None
    assert "no known-truth frames" in _gate(unknown, "min_agreement").detail


def test_agreement_is_not_judged_before_min_frames():
    verdict = shadow_verdict([_device("early", frames=40, known=100, active_right=99, agreement=0.1)], CONFIG)
    assert verdict.outcome == "wait"
    assert _gate(verdict, "min_agreement").passed is None
    assert "min_frames: 40 against 100" in verdict.reason


def test_latency_budget_follows_the_active_models_own_p99_on_each_device():
    assert latency_budget(20.0, CONFIG) == pytest.approx(30.0)  # 1.5x
    assert latency_budget(4.0, CONFIG) == pytest.approx(9.0)  # at least 5 ms of headroom
    assert latency_budget(None, CONFIG) is None
    assert latency_budget(20.0, CONFIG.model_copy(update={"max_latency_p99_ms": 25.0})) == pytest.approx(25.0)
    assert latency_budget(20.0, CONFIG.model_copy(update={"max_latency_ratio": None})) is None
    slow = shadow_verdict([_device("fast", known=40, b=30, active_right=2),
                           _device("slow", known=40, b=30, active_right=2, active_latency=10.0, latency=16.0)],
                          CONFIG)
    assert slow.outcome == "fail"
    latency = _gate(slow, "max_latency_p99_ms")
    assert latency.value == 16.0 and latency.threshold == pytest.approx(15.0) and "worst: slow" in latency.detail


def test_any_candidate_error_fails():
    verdict = shadow_verdict([_device("a"), _device("b", errors=1)], CONFIG)
    assert verdict.outcome == "fail"
    assert [g.name for g in verdict.failed_gates()] == ["max_errors"]


def test_waits_for_shadow_time_and_for_every_device_to_hold_in_shadow():
    young = shadow_verdict([_device("a", seconds=5, known=40, b=30, active_right=2)], CONFIG)
    assert young.outcome == "wait" and "min_shadow_seconds: 5 against 30" in young.reason
    installing = shadow_verdict([_device("a", known=40, b=30, active_right=2),
                                 _device("b", frames=0, agreement=None, seconds=0, shadowing=False)], CONFIG)
    assert installing.outcome == "wait" and "not shadowing yet: b" in installing.reason


def test_install_failures_count_against_the_rate_and_failed_devices_are_not_judged():
    config = CONFIG.model_copy(update={"max_install_failure_rate": 0.5})
    within = shadow_verdict([_device("a", known=40, b=30, active_right=2),
                             _device("broken", frames=0, failed=True)], config)
    assert within.outcome == "pass", within.reason
    assert _gate(within, "max_install_failure_rate").value == 0.5
    over = shadow_verdict([_device("a"), _device("x", failed=True), _device("y", failed=True)], config)
    assert over.outcome == "fail" and "2 of 3 failed: x, y" in over.reason
    everyone = shadow_verdict([_device("x", failed=True)], CONFIG.model_copy(update={"max_install_failure_rate": 1}))
    assert everyone.outcome == "fail" and "no device left" in everyone.reason


def test_an_empty_wave_passes():
    assert shadow_verdict([], CONFIG).outcome == "pass"
    assert switch_verdict([], CONFIG).outcome == "pass"


def test_windows_of_older_agents_without_paired_outcomes_decide_nothing():
    old = ShadowWindow(frames=150, agreement=0.9, corrected_frames=100, active_accuracy=0.1, candidate_accuracy=0.9)
    verdict = shadow_verdict([DeviceEvidence("a", shadowing=True, shadow=totals([old]), shadow_seconds=60)], CONFIG)
    assert verdict.outcome == "wait" and _gate(verdict, "paired_accuracy").evidence["known"] == 0


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
