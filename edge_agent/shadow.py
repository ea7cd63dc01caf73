"""Shadow mode: the candidate model sees the live frames through a bounded queue that drops
when full, so it never delays the live result; it accumulates the window's comparison.

The shadow budget (:class:`ShadowBudget`) bounds what the candidate may cost the device:
``share`` of the live frames offered to it (1.0 = all, 0.5 = every other one), and
``max_busy_fraction``, the most of the wall time over the last ``window_s`` seconds the
candidate may spend inferring (its own CPU or GPU time, the live model keeps the rest). A frame
that arrives while the candidate is over budget is skipped and counted (``frames_skipped_budget``),
apart from frames dropped because the queue was full (``frames_dropped``). Frames left out by
``share`` are not counted: they were never meant for the candidate.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.inference.types import Detection
from edge_agent.matching import agreement_counts, confident_agreement_counts, frame_is_correct
from edge_agent.stats import LatencyWindow

log = structlog.get_logger(__name__)


@dataclass
class ShadowItem:
    image: np.ndarray
    active: list[Detection]
    active_latency_ms: float
    truths: list[Detection] | None
    frame_id: str = ""
    active_version: int | None = None


class ShadowBudget(BaseModel):
    """What the candidate may cost; the defaults (everything, no time limit) keep the old behaviour."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    share: float = Field(1.0, gt=0, le=1, description="share of live frames offered to the candidate")
    max_busy_fraction: float = Field(
        1.0, gt=0, le=1, description="most of the wall time the candidate may spend inferring"
    )
    window_s: float = Field(10.0, gt=0, description="sliding window the busy fraction is measured over")


class BusyWindow:
    """Time spent busy within the last ``window_s`` seconds, from ``(start, end)`` intervals.

    Amortised O(1) per call: intervals are appended in time order and expire from the left.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._intervals: deque[tuple[float, float]] = deque()
        self._total = 0.0  # sum of the stored intervals' full lengths
        self.busy_since: float | None = None  # an inference in progress

    def add(self, start: float, end: float) -> None:
        self._intervals.append((start, end))
        self._total += end - start

    def busy(self, now: float) -> float:
        cutoff = now - self.window_s
        while self._intervals and self._intervals[0][1] <= cutoff:
            start, end = self._intervals.popleft()
            self._total -= end - start
        busy = self._total
        if self._intervals and self._intervals[0][0] < cutoff:
            busy -= cutoff - self._intervals[0][0]  # the oldest interval only partly inside
        if self.busy_since is not None:
            busy += now - max(self.busy_since, cutoff)
        return max(0.0, busy)

    def fraction(self, now: float) -> float:
        return self.busy(now) / self.window_s


class ShadowRunner:
    def __init__(
        self,
        detector,
        window_frames: int,
        queue_size: int = 8,
        iou: float = 0.5,
        budget: ShadowBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_compared: Callable[[ShadowItem, list[Detection]], object] | None = None,
        pending_truth: int = 256,
    ) -> None:
        self._detector = detector
        # Called on the shadow thread with each frame both models ran on (e.g. to collect disagreements).
        self._on_compared = on_compared
        self._window = window_frames
        self._iou = iou
        self.budget = budget or ShadowBudget()
        self._clock = clock
        self._busy = BusyWindow(self.budget.window_s)
        self._share_credit = 0.0
        self._queue: queue.Queue[ShadowItem | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self.frames = 0
        self.dropped = 0
        self.skipped_budget = 0
        self.offered = 0
        self.errors = 0
        self.late_truths = 0  # corrections that joined the comparison after the frame was served
        self.last_error = ""
        self._agreed = 0
        self._boxes = 0
        self._confident_found = 0
        self._confident = 0
        self._corrected = 0
        self._active_correct = 0
        self._candidate_correct = 0
        self._candidate_only = 0
        self._active_only = 0
        # Both models' boxes on frames without a known truth yet, by frame id, so that a correction
        # the line HMI posts later (judge_late) is a paired outcome too. Bounded: oldest leave first.
        self._pending_truth: OrderedDict[str, tuple[list[Detection], list[Detection]]] = OrderedDict()
        self._pending_max = pending_truth
        self._active_latency = LatencyWindow()
        self._candidate_latency = LatencyWindow()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shadow", daemon=True)
        self._thread.start()

    def offer(self, item: ShadowItem) -> bool:
        """Never blocks the live path. True when the candidate will see the frame; a frame left out
        by the share is not counted, one over the time budget or past a full queue is."""
        if self.done.is_set():
            return False
        with self._lock:
            self.offered += 1
            self._share_credit += self.budget.share
            if self._share_credit < 1.0 - 1e-9:  # deterministic: share 0.5 = every other frame
                return False
            self._share_credit -= 1.0
            if (self.budget.max_busy_fraction < 1.0
                    and self._busy.fraction(self._clock()) >= self.budget.max_busy_fraction):
                self.skipped_budget += 1
                return False
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.dropped += 1
            return False
        return True

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            try:
                self._process(item)
            finally:
                self._queue.task_done()

    def _process(self, item: ShadowItem) -> None:
        start = self._clock()
        with self._lock:
            self._busy.busy_since = start
        result, error = None, None
        try:
            result = self._detector.infer(item.image)
        except Exception as exc:  # a crashing candidate is a failed gate, not a crashed agent
            error = exc
        end = self._clock()
        if result is not None:
            agreed, total = agreement_counts(item.active, result.detections, iou=self._iou)
            found, confident = confident_agreement_counts(item.active, result.detections, iou=self._iou)
        with self._lock:
            self._busy.busy_since = None
            self._busy.add(start, end)
            self.frames += 1
            if result is None:
                self.errors += 1
                self.last_error = f"{type(error).__name__}: {error}"
            else:
                self._agreed += agreed
                self._boxes += total
                self._confident_found += found
                self._confident += confident
                self._active_latency.add(item.active_latency_ms)
                self._candidate_latency.add(result.latency_ms)
                if item.truths is not None:
                    self._count_known(frame_is_correct(item.active, item.truths, iou=self._iou),
                                      frame_is_correct(result.detections, item.truths, iou=self._iou))
                elif item.frame_id and self._pending_max:
                    self._pending_truth.pop(item.frame_id, None)
                    self._pending_truth[item.frame_id] = (list(item.active), list(result.detections))
                    while len(self._pending_truth) > self._pending_max:
                        self._pending_truth.popitem(last=False)
        if result is not None and self._on_compared is not None:
            try:
                self._on_compared(item, list(result.detections))
            except Exception as exc:  # collecting a sample must never break the comparison
                log.warning("shadow.on_compared_failed", error=str(exc))
        self._check_done()

    def judge_late(self, frame_id: str, truths: list[Detection]) -> bool:
        """A correction that arrived after both models ran on the frame: it joins this window's paired
        outcomes (once per frame). False when the candidate never saw the frame or it left the buffer."""
        with self._lock:
            pair = self._pending_truth.pop(frame_id, None)
            if pair is None:
                return False
            active, candidate = pair
            self._count_known(frame_is_correct(active, truths, iou=self._iou),
                              frame_is_correct(candidate, truths, iou=self._iou))
            self.late_truths += 1
            return True

    def take_pending(self) -> OrderedDict[str, tuple[list[Detection], list[Detection]]]:
        """Frames still waiting for a truth, handed to the next window's runner (the comparison is
        kept for the buffer's lifetime, not just one window's)."""
        with self._lock:
            pending, self._pending_truth = self._pending_truth, OrderedDict()
            return pending

    def adopt_pending(self, pending: OrderedDict[str, tuple[list[Detection], list[Detection]]]) -> None:
        with self._lock:
            for frame_id, pair in pending.items():
                self._pending_truth.setdefault(frame_id, pair)
            while len(self._pending_truth) > self._pending_max:
                self._pending_truth.popitem(last=False)

    def _count_known(self, active_right: bool, candidate_right: bool) -> None:
        """One frame whose truth is known (caller holds the lock): both models judged on it."""
        self._corrected += 1
        self._active_correct += active_right
        self._candidate_correct += candidate_right
        self._candidate_only += candidate_right and not active_right
        self._active_only += active_right and not candidate_right

    def _check_done(self) -> None:
        if self.frames >= self._window:
            self.done.set()

    def report(self) -> dict:
        with self._lock:
            return {
                "frames_compared": self.frames,
                "frames_dropped": self.dropped,
                "agreement": (self._agreed / self._boxes) if self._boxes else (1.0 if self.frames else None),
                "confident_agreement": (self._confident_found / self._confident) if self._confident else None,
                "corrected_frames": self._corrected,
                "active_accuracy": self._active_correct / self._corrected if self._corrected else None,
                "candidate_accuracy": self._candidate_correct / self._corrected if self._corrected else None,
                "candidate_only_correct": self._candidate_only,
                "active_only_correct": self._active_only,
                "active_latency_ms_p50": self._active_latency.percentile(50),
                "active_latency_ms_p99": self._active_latency.percentile(99),
                "candidate_latency_ms_p50": self._candidate_latency.percentile(50),
                "candidate_latency_ms_p99": self._candidate_latency.percentile(99),
                "errors": self.errors,
                "frames_skipped_budget": self.skipped_budget,
            }

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued frame was processed (benchmarks, tests); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        self.done.set()
        while True:  # make room for the sentinel without blocking
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                    self._queue.task_done()
        self._thread.join(timeout=5)
