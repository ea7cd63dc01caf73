"""Decides which frames to send back and puts them in the spool.

Reasons: a QA correction that disagrees with the model, a low-confidence detection, or a
random share; each with an hourly budget so a broken camera cannot flood the server.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import deque
from datetime import UTC, datetime

import cv2
import numpy as np

from edge_agent.inference.types import Detection
from edge_agent.matching import frame_is_correct
from edge_agent.sources import Frame
from edge_agent.spool import Spool
from protocol.messages import Box, SampleReason


def to_box(d: Detection, width: int, height: int) -> dict:
    cx, cy, w, h = d.to_yolo(width, height)
    clamp = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
    return Box(cls=d.cls, cx=clamp(cx), cy=clamp(cy), w=clamp(w), h=clamp(h),
               conf=round(min(max(d.conf, 0.0), 1.0), 4)).model_dump()


def truths_of(frame: Frame) -> list[Detection] | None:
    if frame.labels is None:
        return None
    h, w = frame.image.shape[:2]
    return [Detection.from_yolo(c, cx, cy, bw, bh, w, h, conf=1.0) for c, cx, cy, bw, bh in frame.labels]


class SampleCollector:
    def __init__(self, spool: Spool, *, corrections: bool, low_confidence: bool,
                 low_band: tuple[float, float], random_rate: float, max_per_hour: int, jpeg_quality: int,
                 rng: random.Random | None = None) -> None:
        self._spool = spool
        self._corrections = corrections
        self._low_confidence = low_confidence
        self._low_band = low_band
        self._random_rate = random_rate
        self._max_per_hour = max_per_hour
        self._quality = jpeg_quality
        self._rng = rng or random.Random()
        self._recent: deque[float] = deque()
        self.collected = 0
        self.rate_limited = 0

    def reason_for(self, frame: Frame, detections: list[Detection]) -> SampleReason | None:
        truths = truths_of(frame)
        if self._corrections and truths is not None and not frame_is_correct(detections, truths):
            return SampleReason.CORRECTION
        lo, hi = self._low_band
        if self._low_confidence and any(lo <= d.conf < hi for d in detections):
            return SampleReason.LOW_CONFIDENCE
        if self._random_rate and self._rng.random() < self._random_rate:
            return SampleReason.RANDOM
        return None

    def _within_budget(self) -> bool:
        now = time.monotonic()
        while self._recent and now - self._recent[0] > 3600:
            self._recent.popleft()
        if len(self._recent) >= self._max_per_hour:
            self.rate_limited += 1
            return False
        self._recent.append(now)
        return True

    def consider(self, frame: Frame, detections: list[Detection], model_version: int | None) -> bool:
        reason = self.reason_for(frame, detections)
        if reason is None:
            return False
        # Idempotency key: the pixels, not the file name, so a re-read frame is not sent twice.
        sample_id = hashlib.sha256(np.ascontiguousarray(frame.image).tobytes()).hexdigest()[:32]
        # Check for a repeat before taking from the hourly budget: a frozen camera repeating one
        # frame must not use up the budget that real samples need.
        if self._spool.seen(sample_id) or not self._within_budget():
            return False
        ok, encoded = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, self._quality])
        if not ok:
            return False
        data = encoded.tobytes()
        sha = hashlib.sha256(data).hexdigest()
        h, w = frame.image.shape[:2]
        meta = {
            "sha256": sha, "size_bytes": len(data), "width": w, "height": h, "reason": reason.value,
            "model_version": model_version, "frame_id": frame.frame_id[:128],
            "captured_at": datetime.now(UTC).isoformat(),
            "predictions": [to_box(d, w, h) for d in detections][:300],
            "labels": ([Box(cls=c, cx=cx, cy=cy, w=bw, h=bh).model_dump() for c, cx, cy, bw, bh in frame.labels]
                       if frame.labels is not None else None),
        }
        if self._spool.put(sample_id, data, "image/jpeg", meta):
            self.collected += 1
            return True
        return False
