from edge_agent.runtime import shadow_gate_failure


def _report(**overrides):
    report = {"errors": 0, "active_accuracy": 0.5, "candidate_accuracy": 0.8, "corrected_frames": 20,
              "frames_compared": 20, "frames_dropped": 0, "agreement": 0.4}
    report.update(overrides)
    return report


def test_better_candidate_passes():
    assert shadow_gate_failure(_report(), max_errors=0, accuracy_tolerance=0.0) == ""


def test_errors_fail_the_window():
    assert "2 candidate errors" in shadow_gate_failure(_report(errors=2), max_errors=0, accuracy_tolerance=0.0)
    assert shadow_gate_failure(_report(errors=2), max_errors=2, accuracy_tolerance=0.0) == ""


def test_less_accurate_candidate_fails_unless_within_tolerance():
    worse = _report(active_accuracy=0.9, candidate_accuracy=0.8)
    assert "below the active model's 0.90" in shadow_gate_failure(worse, max_errors=0, accuracy_tolerance=0.0)
    assert shadow_gate_failure(worse, max_errors=0, accuracy_tolerance=0.15) == ""


def test_without_corrected_frames_accuracy_is_not_judged():
    assert shadow_gate_failure(_report(active_accuracy=None, candidate_accuracy=None, corrected_frames=0),
                               max_errors=0, accuracy_tolerance=0.0) == ""
