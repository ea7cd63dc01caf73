"""Drift window: what the live loop feeds per frame and publishes on the ``drift`` topic per window.

Pure and cheap (no I/O, no threads of its own): one ``add()`` per served frame computes the image
statistics of ``edge_agent.drift_stats`` (on every ``image_every``-th frame) and records the
frame's detections and QA verdict; ``due()`` says when the window is complete (by frame count or
by time, whichever comes first); ``report()`` turns it into a ``DriftReport`` and opens the next.

Wiring in the agent loop (one call per frame; see ``DriftWindow.add``)::

    window = DriftWindow(settings.drift, num_classes=len(detector.class_names))
    ...
    window.add(frame.image, detections, corrected)   # corrected: None when QA did not judge it
    if window.due():
        mqtt.publish(window.report(device_id, active_version))

When the active model changes, call ``restart()``: a window must describe one model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.drift_stats import StatsAccumulator
from protocol.messages import DriftReport, Histogram


class DriftSettings(BaseModel):
    """Drift statistics on the device; env as JSON, e.g. ``EDGELOOP_AGENT_DRIFT='{"window_frames": 300}'``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # A window closes after this many frames, or after window_seconds, whichever comes first
    # (0 turns that limit off). Fewer than min_frames never make a report: too noisy to judge.
    window_frames: int = Field(500, ge=0)
    window_seconds: float = Field(300.0, ge=0)
    min_frames: int = Field(100, ge=1)
    # Image statistics on every n-th frame only (detections are always counted); 1 = every frame.
    # Every 4th by default: right after inference the frame is cache-cold and they cost ~0.1 ms
    # (measured, benchmarks/drift.py), 2 % of a 5 ms inference on its own; a quarter of a
    # 500-frame window still gives the server more than the 100 values it scores a metric from.
    image_every: int = Field(4, ge=1)


class _Det(Protocol):
    cls: int
    conf: float


class DriftWindow:
    def __init__(self, settings: DriftSettings, num_classes: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if settings.window_frames == 0 and settings.window_seconds == 0:
            raise ValueError("a drift window needs window_frames or window_seconds")
        self.settings = settings
        self.num_classes = num_classes
        self._clock, self._now = clock, now
        self._lock = threading.Lock()  # add_qa may come from the HMI thread
        self.window = 0
        self._open()

    def _open(self) -> None:
        self._stats = StatsAccumulator(self.num_classes)
        self._opened = self._clock()
        self._started_at = self._now()
        self._qa_frames = 0
        self._corrected = 0
        self._seen = 0

    @property
    def frames(self) -> int:
        return self._stats.frames

    def add(self, image: np.ndarray, detections: Sequence[_Det], corrected: bool | None = None) -> None:
        """One served frame: its pixels, the active model's detections, and QA's verdict if any
        (True = QA corrected the model on this frame, False = QA confirmed it, None = not judged)."""
        if self._seen % self.settings.image_every == 0:
            self._stats.add_image(image)
        self._seen += 1
        if detections:
            self._stats.add_detections([d.cls for d in detections], [d.conf for d in detections])
        else:
            self._stats.add_detections((), ())
        if corrected is not None:
            self.add_qa(corrected)

    def add_qa(self, corrected: bool) -> None:
        """A QA verdict that arrives apart from its frame (the line HMI)."""
        with self._lock:
            self._qa_frames += 1
            self._corrected += bool(corrected)

    def due(self, now: float | None = None) -> bool:
        s, frames = self.settings, self._stats.frames
        if frames < s.min_frames:
            return False
        if s.window_frames and frames >= s.window_frames:
            return True
        elapsed = (self._clock() if now is None else now) - self._opened
        return bool(s.window_seconds) and elapsed >= s.window_seconds

    def report(self, device_id: str, model_version: int | None) -> DriftReport:
        """The window as a message; the next window opens."""
        with self._lock:
            qa, corrected = self._qa_frames, self._corrected
            message = DriftReport(
                device_id=device_id, model_version=model_version, window=self.window,
                frames=self._stats.frames, started_at=self._started_at,
                histograms={name: Histogram(edges=list(edges), counts=counts)
                            for name, (edges, counts) in self._stats.histograms().items()},
                correction_rate=corrected / qa if qa else None, qa_frames=qa,
            )
            self.window += 1
            self._open()
        return message

    def restart(self) -> None:
        """Drop the open window (the active model changed): a window describes one model."""
        with self._lock:
            self._open()
