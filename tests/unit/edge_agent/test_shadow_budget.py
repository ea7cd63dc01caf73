"""Shadow budget: the share of frames the candidate gets, its cap on busy time, and that the live
path never waits for it. A fake clock makes the time budget exact; the worker thread is real."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.inference.types import Detection, InferenceResult
from edge_agent.shadow import BusyWindow, ShadowBudget, ShadowItem, ShadowRunner

BOX = Detection(0, 0.9, 10, 10, 20, 20)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class TimedDetector:
    """Each inference takes ``cost`` seconds of the fake clock; records when it ran."""

    def __init__(self, clock: FakeClock, cost: float = 0.1) -> None:
        self.clock, self.cost = clock, cost
        self.intervals: list[tuple[float, float]] = []
        self.gate: threading.Event | None = None

    def infer(self, image):
        start = self.clock()
        if self.gate is not None:
            assert self.gate.wait(30)
        self.clock.advance(self.cost)
        self.intervals.append((start, self.clock()))
        return InferenceResult(detections=(BOX,), latency_ms=self.cost * 1000)


def _item() -> ShadowItem:
    return ShadowItem(np.zeros((8, 8, 3), np.uint8), [BOX], 1.0, None)


def _run(runner: ShadowRunner, clock: FakeClock, frames: int, frame_interval: float) -> list[bool]:
    taken = []
    for _ in range(frames):
        taken.append(runner.offer(_item()))
        assert runner.wait_idle(30)
        clock.advance(frame_interval)
    return taken


def test_defaults_give_the_candidate_every_frame_and_keep_the_old_constructor() -> None:
    clock = FakeClock()
    det = TimedDetector(clock)
    runner = ShadowRunner(det, 1000, 4, clock=clock)  # positional (detector, window, queue_size) as before
    assert runner.budget == ShadowBudget()
    assert all(_run(runner, clock, 30, 0.01))  # the candidate is busy 90 % of the time: no limit by default
    report = runner.report()
    runner.close()
    assert report["frames_compared"] == 30
    assert report["frames_skipped_budget"] == 0 and report["frames_dropped"] == 0
    assert report["agreement"] == 1.0


@pytest.mark.parametrize(("share", "expected"), [(1.0, 24), (0.5, 12), (0.25, 6), (1 / 3, 8)])
def test_share_offers_an_evenly_spread_part_of_the_frames(share: float, expected: int) -> None:
    clock = FakeClock()
    runner = ShadowRunner(TimedDetector(clock, cost=0.0), 1000, budget=ShadowBudget(share=share), clock=clock)
    taken = _run(runner, clock, 24, 0.1)
    report = runner.report()
    runner.close()
    assert sum(taken) == report["frames_compared"] == expected
    if share == 0.5:
        assert taken == [False, True] * 12  # every other frame, not the first half
    # Frames left out by the share were never meant for the candidate: not counted as skipped.
    assert report["frames_skipped_budget"] == 0 and report["frames_dropped"] == 0


def test_time_budget_caps_the_candidates_busy_fraction_and_counts_skips() -> None:
    clock = FakeClock()
    det = TimedDetector(clock, cost=0.1)
    budget = ShadowBudget(max_busy_fraction=0.5, window_s=1.0)
    runner = ShadowRunner(det, 10_000, budget=budget, clock=clock)
    taken = _run(runner, clock, 200, 0.1)  # alone, the candidate would be busy 50 % + of every window
    report = runner.report()
    runner.close()
    skipped = report["frames_skipped_budget"]
    assert skipped > 0
    assert report["frames_compared"] + skipped == 200 == runner.offered
    assert report["frames_dropped"] == 0  # budget skips are not queue drops
    assert sum(taken) == report["frames_compared"]
    # Over every 1 s window the candidate was busy at most the budget plus the one inference that
    # started just under it.
    ends = [end for _, end in det.intervals]
    for t in np.arange(1.0, clock.now, 0.05):
        busy = sum(max(0.0, min(e, t) - max(s, t - 1.0)) for s, e in det.intervals)
        assert busy <= 0.5 + 0.1 + 1e-9, (t, busy)
    assert ends[-1] > clock.now - 1.5  # and it kept being served, not starved


def test_generous_budget_skips_nothing() -> None:
    clock = FakeClock()
    runner = ShadowRunner(TimedDetector(clock, cost=0.01), 1000,
                          budget=ShadowBudget(max_busy_fraction=0.5, window_s=1.0), clock=clock)
    assert all(_run(runner, clock, 100, 0.1))  # busy ~9 %: under budget
    assert runner.report()["frames_skipped_budget"] == 0
    runner.close()


def test_an_inference_in_progress_counts_against_the_budget() -> None:
    clock = FakeClock()
    det = TimedDetector(clock, cost=0.0)
    det.gate = threading.Event()
    runner = ShadowRunner(det, 1000, queue_size=4,
                          budget=ShadowBudget(max_busy_fraction=0.5, window_s=1.0), clock=clock)
    assert runner.offer(_item())  # the worker takes it and hangs in infer
    while runner._busy.busy_since is None:
        threading.Event().wait(0.001)
    clock.advance(0.6)  # a slow candidate: 0.6 s of the last 1 s, still running
    assert not runner.offer(_item())
    assert runner.skipped_budget == 1 and runner.dropped == 0
    det.gate.set()
    assert runner.wait_idle(30)
    runner.close()


def test_live_path_never_waits_for_a_stuck_candidate() -> None:
    clock = FakeClock()
    det = TimedDetector(clock, cost=0.0)
    det.gate = threading.Event()  # the candidate never returns until released
    runner = ShadowRunner(det, 1000, queue_size=3, clock=clock)
    results = [runner.offer(_item()) for _ in range(50)]  # would hang here if offer blocked
    # One frame inside the stuck inference (or still queued), three queued, the rest dropped and counted.
    assert runner.dropped >= 50 - 4 and sum(results) == 50 - runner.dropped
    det.gate.set()
    assert runner.wait_idle(30)
    report = runner.report()
    runner.close()
    assert report["frames_dropped"] == runner.dropped and report["frames_skipped_budget"] == 0


def test_a_crashing_candidate_counts_errors_and_busy_time() -> None:
    clock = FakeClock()

    class Crashing:
        def infer(self, image):
            clock.advance(0.2)
            raise RuntimeError("CUDA error 700")

    runner = ShadowRunner(Crashing(), 1000, budget=ShadowBudget(max_busy_fraction=0.3, window_s=1.0),
                          clock=clock)
    taken = _run(runner, clock, 10, 0.0)
    report = runner.report()
    runner.close()
    assert report["errors"] == sum(taken) == report["frames_compared"]
    assert report["frames_skipped_budget"] > 0  # time spent crashing is time spent
    assert runner.last_error == "RuntimeError: CUDA error 700"


def test_window_marks_itself_done() -> None:
    clock = FakeClock()
    runner = ShadowRunner(TimedDetector(clock, cost=0.0), 5, clock=clock)
    _run(runner, clock, 5, 0.1)
    assert runner.done.is_set()
    assert not runner.offer(_item())  # a finished window takes no more frames
    runner.close()


def test_busy_window_is_exact_at_its_edges() -> None:
    w = BusyWindow(1.0)
    w.add(0.0, 0.4)
    w.add(0.5, 0.7)
    assert w.busy(0.7) == pytest.approx(0.6)
    assert w.busy(1.2) == pytest.approx(0.4)  # [0.2, 0.4] + [0.5, 0.7]
    assert w.busy(1.6) == pytest.approx(0.1)  # the first interval expired, half of the second left
    assert w.busy(5.0) == 0.0
    w.busy_since = 4.8
    assert w.busy(5.0) == pytest.approx(0.2)
    assert w.fraction(5.0) == pytest.approx(0.2)


@pytest.mark.parametrize("bad", [{"share": 0}, {"share": 1.5}, {"max_busy_fraction": 0}, {"window_s": 0},
                                 {"max_busy_fraction": 1.2}, {"sharre": 0.5}])
def test_budget_settings_are_validated(bad) -> None:
    with pytest.raises(ValidationError):
        ShadowBudget(**bad)
