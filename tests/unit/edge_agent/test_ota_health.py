"""Post-switch health check: errors, detection-rate and confidence collapse against the old model."""

from __future__ import annotations

import pytest

from edge_agent.ota.health import BaselineWindow, FrameOutcome, HealthBaseline, HealthMonitor, HealthSettings

SETTINGS = HealthSettings(window_frames=20, max_error_rate=0.1, min_confidence_ratio=0.5,
                          min_detection_rate_ratio=0.5, min_baseline_frames=10)


def _baseline(detection_rate: float = 0.9, confidence: float = 0.8, frames: int = 100) -> HealthBaseline:
    return HealthBaseline(version=3, frames=frames, detection_rate=detection_rate, mean_top_confidence=confidence)


def _run(monitor: HealthMonitor, outcomes: list[FrameOutcome]):
    verdicts = [monitor.observe(o) for o in outcomes]
    decided = [v for v in verdicts if v is not None]
    return verdicts, (decided[0] if decided else None)


def test_undecided_until_the_window_is_full_then_healthy() -> None:
    monitor = HealthMonitor(SETTINGS, _baseline(), version=4)
    verdicts, verdict = _run(monitor, [FrameOutcome.of([0.85, 0.3])] * 20)
    assert all(v is None for v in verdicts[:19])
    assert verdict is not None and verdict.healthy
    assert "version 4 healthy" in verdict.reason and "previous: detection rate 0.90" in verdict.reason


def test_errors_over_the_allowed_rate_fail_early() -> None:
    monitor = HealthMonitor(SETTINGS, _baseline(), version=4)
    outcomes = [FrameOutcome.of([0.9])] * 5 + [FrameOutcome.error()] * 3
    verdicts, verdict = _run(monitor, outcomes)
    assert verdicts[-1] is verdict  # decided at the third error, 8 frames in, not after 20
    assert not verdict.healthy
    assert verdict.reason == "version 4 failed 3 of its first 8 frames (at most 2 of 20 allowed)"


def test_errors_within_the_allowed_rate_pass() -> None:
    monitor = HealthMonitor(SETTINGS, _baseline(), version=4)
    _, verdict = _run(monitor, [FrameOutcome.error()] * 2 + [FrameOutcome.of([0.8])] * 18)
    assert verdict.healthy and "2 errors" in verdict.reason


def test_detection_rate_collapse_rolls_back_with_both_figures() -> None:
    monitor = HealthMonitor(SETTINGS, _baseline(detection_rate=0.9), version=4)
    outcomes = [FrameOutcome.of([0.9])] * 4 + [FrameOutcome.of([])] * 16  # detects in 20 % of frames
    _, verdict = _run(monitor, outcomes)
    assert not verdict.healthy
    assert verdict.reason.startswith("detection rate collapsed: version 4 detected objects in 20% of 20 frames")
    assert "version 3 in 90% of its last 100" in verdict.reason


def test_confidence_collapse_rolls_back() -> None:
    monitor = HealthMonitor(SETTINGS, _baseline(confidence=0.8), version=4)
    _, verdict = _run(monitor, [FrameOutcome.of([0.3, 0.1])] * 20)
    assert not verdict.healthy
    assert verdict.reason == ("confidence collapsed: version 4 mean top confidence 0.30, version 3 0.80 "
                              "(at least 50% of it required)")


def test_a_moderately_less_confident_model_is_not_a_collapse() -> None:
    monitor = HealthMonitor(SETTINGS, _baseline(confidence=0.8), version=4)
    _, verdict = _run(monitor, [FrameOutcome.of([0.5])] * 20)
    assert verdict.healthy


@pytest.mark.parametrize(
    ("baseline", "why"),
    [
        (None, "no previous model to compare with"),
        (HealthBaseline(frames=0), "no previous model to compare with"),
        (_baseline(frames=5), "baseline of 5 frames too thin to compare"),
        (_baseline(detection_rate=0.0), "baseline of 100 frames too thin to compare"),
    ],
)
def test_without_a_usable_baseline_only_errors_count(baseline, why) -> None:
    monitor = HealthMonitor(SETTINGS, baseline, version=1)
    _, verdict = _run(monitor, [FrameOutcome.of([])] * 20)  # detects nothing, yet nothing to compare
    assert verdict.healthy and why in verdict.reason


def test_the_verdict_is_final() -> None:
    monitor = HealthMonitor(SETTINGS, _baseline(), version=4)
    _, verdict = _run(monitor, [FrameOutcome.error()] * 3)
    assert monitor.observe(FrameOutcome.of([0.9])) is verdict
    assert monitor.frames == 3


def test_baseline_window_rolls_and_summarises() -> None:
    window = BaselineWindow(size=4)
    for outcome in (FrameOutcome.error(), FrameOutcome.of([0.2]), FrameOutcome.of([]),
                    FrameOutcome.of([0.6, 0.1]), FrameOutcome.of([0.8])):
        window.add(outcome)
    # The error fell out of the window: 4 frames, 3 with detections (0.2, 0.6, 0.8).
    snap = window.snapshot(version=7)
    assert snap == HealthBaseline(version=7, frames=4, error_rate=0.0, detection_rate=0.75,
                                  mean_top_confidence=0.533333)
    window.clear()
    assert window.snapshot(None).frames == 0


def test_baseline_error_rate_counts_failed_frames_and_rates_exclude_them() -> None:
    window = BaselineWindow(size=10)
    for outcome in [FrameOutcome.error()] * 2 + [FrameOutcome.of([0.5])] * 2:
        window.add(outcome)
    snap = window.snapshot(1)
    assert snap.error_rate == 0.5 and snap.detection_rate == 1.0 and snap.mean_top_confidence == 0.5


def test_baseline_round_trips_through_json() -> None:
    base = _baseline()
    assert HealthBaseline.model_validate_json(base.model_dump_json()) == base
