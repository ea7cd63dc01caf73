"""Shadow mode: the candidate model sees the live frames through a bounded queue that drops
when full, so it never delays the live result; it accumulates the window's comparison."""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass

import numpy as np

from edge_agent.inference.types import Detection
from edge_agent.matching import agreement_counts, frame_is_correct
from edge_agent.stats import LatencyWindow


@dataclass
class ShadowItem:
    image: np.ndarray
    active: list[Detection]
    active_latency_ms: float
    truths: list[Detection] | None


class ShadowRunner:
    def __init__(self, detector, window_frames: int, queue_size: int = 8, iou: float = 0.5) -> None:
        self._detector = detector
        self._window = window_frames
        self._iou = iou
        self._queue: queue.Queue[ShadowItem | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self.frames = 0
        self.dropped = 0
        self.errors = 0
        self.last_error = ""
        self._agreed = 0
        self._boxes = 0
        self._corrected = 0
        self._active_correct = 0
        self._candidate_correct = 0
        self._active_latency = LatencyWindow()
        self._candidate_latency = LatencyWindow()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shadow", daemon=True)
        self._thread.start()

    def offer(self, item: ShadowItem) -> None:
        """Never blocks the live path: a full queue drops the frame and counts it."""
        if self.done.is_set():
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                result = self._detector.infer(item.image)
            except Exception as exc:  # a crashing candidate is a failed gate, not a crashed agent
                with self._lock:
                    self.errors += 1
                    self.frames += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                self._check_done()
                continue
            agreed, total = agreement_counts(item.active, result.detections, iou=self._iou)
            with self._lock:
                self.frames += 1
                self._agreed += agreed
                self._boxes += total
                self._active_latency.add(item.active_latency_ms)
                self._candidate_latency.add(result.latency_ms)
                if item.truths is not None:
                    self._corrected += 1
                    self._active_correct += frame_is_correct(item.active, item.truths, iou=self._iou)
                    self._candidate_correct += frame_is_correct(result.detections, item.truths, iou=self._iou)
            self._check_done()

    def _check_done(self) -> None:
        if self.frames >= self._window:
            self.done.set()

    def report(self) -> dict:
        with self._lock:
            return {
                "frames_compared": self.frames,
                "frames_dropped": self.dropped,
                "agreement": (self._agreed / self._boxes) if self._boxes else (1.0 if self.frames else None),
                "corrected_frames": self._corrected,
                "active_accuracy": self._active_correct / self._corrected if self._corrected else None,
                "candidate_accuracy": self._candidate_correct / self._corrected if self._corrected else None,
                "active_latency_ms_p50": self._active_latency.percentile(50),
                "active_latency_ms_p99": self._active_latency.percentile(99),
                "candidate_latency_ms_p50": self._candidate_latency.percentile(50),
                "candidate_latency_ms_p99": self._candidate_latency.percentile(99),
                "errors": self.errors,
            }

    def close(self) -> None:
        self.done.set()
        while True:  # make room for the sentinel without blocking
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
        self._thread.join(timeout=5)
