"""Decides which frames to send back and puts them in the spool.

Reasons: a QA/operator correction that disagrees with the model (labels beside a folder frame,
or posted by the line HMI), a low-confidence detection, a shadow candidate that disagrees with
the active model, or a random share. Each reason has its own hourly rate limit and daily quota
(UTC day, persisted across restarts) under one overall hourly cap, so a broken camera cannot
flood the server; near-duplicates of recently accepted samples are dropped before they use any
of it.

Thread-safe: the frame loop, the shadow thread and the HMI thread may all call in; one lock
makes each decision and its bookkeeping atomic (sampling is rare, so the lock is rarely held).
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import structlog

from edge_agent.dedup import NearDuplicateIndex, perceptual_hash
from edge_agent.inference.types import Detection
from edge_agent.matching import DEFAULT_AGREEMENT_MIN_CONF, DEFAULT_IOU, agreement_counts, frame_is_correct
from edge_agent.sample_limits import DailyQuota, RollingWindow, utc_now
from edge_agent.sources import Frame
from edge_agent.spool import Spool
from protocol.messages import MAX_BOXES, Box, SampleReason

if TYPE_CHECKING:
    from edge_agent.settings import AgentSettings

log = structlog.get_logger(__name__)

Label = tuple[int, float, float, float, float]  # cls, cx, cy, w, h (normalised)


class Outcome(StrEnum):
    COLLECTED = "collected"
    NO_REASON = "no_reason"  # nothing worth sending (e.g. the models agree)
    MODEL_AGREED = "model_agreed"  # a posted correction says what the model said
    DISABLED = "disabled"  # this reason is switched off
    ALREADY_COLLECTED = "already_collected"  # these pixels were sent for this kind of sample before
    NEAR_DUPLICATE = "near_duplicate"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    FAILED = "failed"  # encoding or the spool failed; logged


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: SampleReason | None = None
    sample_id: str | None = None
    retry_after_s: float | None = None  # for RATE_LIMITED / QUOTA_EXHAUSTED

    @property
    def collected(self) -> bool:
        return self.outcome is Outcome.COLLECTED


@dataclass(frozen=True)
class ReasonLimits:
    per_hour: int
    per_day: int


# Corrections are the samples retraining needs, so they get the most room; unlabeled reasons
# only feed the labelling queue and drift checks.
DEFAULT_LIMITS: dict[SampleReason, ReasonLimits] = {
    SampleReason.CORRECTION: ReasonLimits(per_hour=5000, per_day=50_000),
    SampleReason.LOW_CONFIDENCE: ReasonLimits(per_hour=600, per_day=5000),
    SampleReason.SHADOW_DISAGREEMENT: ReasonLimits(per_hour=600, per_day=5000),
    SampleReason.RANDOM: ReasonLimits(per_hour=120, per_day=1000),
}

COUNTERS = ("collected", "already_collected", "near_duplicates", "rate_limited", "quota_exhausted", "failed")


def to_box(d: Detection, width: int, height: int) -> dict:
    cx, cy, w, h = d.to_yolo(width, height)
    clamp = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
    return Box(cls=d.cls, cx=clamp(cx), cy=clamp(cy), w=clamp(w), h=clamp(h),
               conf=round(min(max(d.conf, 0.0), 1.0), 4)).model_dump()


def labels_to_detections(labels: Sequence[Label], width: int, height: int) -> list[Detection]:
    return [Detection.from_yolo(c, cx, cy, bw, bh, width, height, conf=1.0) for c, cx, cy, bw, bh in labels]


def truths_of(frame: Frame) -> list[Detection] | None:
    if frame.labels is None:
        return None
    h, w = frame.image.shape[:2]
    return labels_to_detections(frame.labels, w, h)


def sample_id_for(image: np.ndarray, reason: SampleReason) -> str:
    """Idempotency key from the pixels, not the file name, so a re-read frame is not sent twice.

    A correction gets its own key: a frame already sent unlabeled (say, for low confidence)
    must still be able to come back with the operator's labels.
    """
    digest = hashlib.sha256()
    if reason is SampleReason.CORRECTION:
        digest.update(b"correction\0")
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:32]


class SampleCollector:
    def __init__(self, spool: Spool, *, corrections: bool, low_confidence: bool,
                 low_band: tuple[float, float], random_rate: float, max_per_hour: int, jpeg_quality: int,
                 rng: random.Random | None = None,
                 limits: Mapping[SampleReason, ReasonLimits] | None = None,
                 quota_path: Path | None = None,
                 dedup: NearDuplicateIndex | None = None,
                 shadow_disagreement: bool = True,
                 disagreement_below: float = 1.0,
                 iou: float = DEFAULT_IOU,
                 agreement_min_conf: float = DEFAULT_AGREEMENT_MIN_CONF,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = utc_now) -> None:
        self._spool = spool
        self._corrections = corrections
        self._low_confidence = low_confidence
        self._low_band = low_band
        self._random_rate = random_rate
        self._quality = jpeg_quality
        self._rng = rng or random.Random()
        self._shadow_disagreement = shadow_disagreement
        self._disagreement_below = disagreement_below
        self._iou = iou
        self._agreement_min_conf = agreement_min_conf
        self._now = now
        limits = {**DEFAULT_LIMITS, **(limits or {})}
        self._total = RollingWindow(max_per_hour, clock=clock)
        self._hourly = {r: RollingWindow(limits[r].per_hour, clock=clock) for r in SampleReason}
        self._daily = DailyQuota({r.value: limits[r].per_day for r in SampleReason}, quota_path, now=now)
        self._dedup = dedup
        self._lock = threading.Lock()
        self._counts = {name: dict.fromkeys(SampleReason, 0) for name in COUNTERS}

    @classmethod
    def from_settings(cls, spool: Spool, settings: AgentSettings, quota_path: Path | None) -> SampleCollector:
        s = settings
        limits = {
            SampleReason.CORRECTION: ReasonLimits(s.correction_max_per_hour, s.correction_max_per_day),
            SampleReason.LOW_CONFIDENCE: ReasonLimits(s.low_confidence_max_per_hour, s.low_confidence_max_per_day),
            SampleReason.SHADOW_DISAGREEMENT: ReasonLimits(s.shadow_disagreement_max_per_hour,
                                                           s.shadow_disagreement_max_per_day),
            SampleReason.RANDOM: ReasonLimits(s.random_max_per_hour, s.random_max_per_day),
        }
        return cls(spool, corrections=s.collect_corrections, low_confidence=s.collect_low_confidence,
                   low_band=s.low_confidence_band, random_rate=s.random_rate, max_per_hour=s.max_samples_per_hour,
                   jpeg_quality=s.jpeg_quality, limits=limits, quota_path=quota_path,
                   dedup=NearDuplicateIndex(s.dedup_max_distance, s.dedup_window),
                   shadow_disagreement=s.collect_shadow_disagreement,
                   disagreement_below=s.shadow_disagreement_below)

    def configure(self, *, random_rate: float | None = None, low_band: tuple[float, float] | None = None,
                  max_per_hour: int | None = None) -> None:
        """Apply a server sampling-config command; None leaves a setting as it is."""
        with self._lock:
            if random_rate is not None:
                self._random_rate = random_rate
            if low_band is not None:
                self._low_band = low_band
            if max_per_hour is not None:
                self._total.limit = max_per_hour

    # ------------------------------------------------------------------ why a frame

    def reason_for(self, frame: Frame, detections: list[Detection]) -> SampleReason | None:
        truths = truths_of(frame)
        if self._corrections and truths is not None and not frame_is_correct(detections, truths, iou=self._iou):
            return SampleReason.CORRECTION
        lo, hi = self._low_band
        if self._low_confidence and any(lo <= d.conf < hi for d in detections):
            return SampleReason.LOW_CONFIDENCE
        if self._random_rate and self._rng.random() < self._random_rate:
            return SampleReason.RANDOM
        return None

    def consider(self, frame: Frame, detections: list[Detection], model_version: int | None) -> bool:
        """The frame loop's call for every frame; True when the frame was collected."""
        reason = self.reason_for(frame, detections)
        if reason is None:
            return False
        return self.collect(frame.image, frame.frame_id, reason, detections, frame.labels, model_version).collected

    def consider_disagreement(self, image: np.ndarray, frame_id: str, active: Sequence[Detection],
                              candidate: Sequence[Detection], model_version: int | None,
                              candidate_version: int | None) -> Decision:
        """The shadow thread's call per compared frame: collect it when the two models disagree.

        Disagreement uses the shadow gate's own measure (confident boxes paired by IoU and class);
        a frame is collected when its agreement is below ``disagreement_below``. The sample
        carries the active model's predictions and version (the event schema has no field for
        the candidate's).
        """
        if not self._shadow_disagreement:
            return Decision(Outcome.DISABLED, SampleReason.SHADOW_DISAGREEMENT)
        agreed, total = agreement_counts(active, candidate, iou=self._iou, min_conf=self._agreement_min_conf)
        if total == 0 or agreed / total >= self._disagreement_below:
            return Decision(Outcome.NO_REASON)
        decision = self.collect(image, frame_id, SampleReason.SHADOW_DISAGREEMENT, active, None, model_version)
        if decision.collected:
            log.debug("collector.shadow_disagreement", frame_id=frame_id, agreed=agreed, boxes=total,
                      active_version=model_version, candidate_version=candidate_version)
        return decision

    def submit_correction(self, image: np.ndarray, frame_id: str, labels: Sequence[Label],
                          detections: Sequence[Detection], model_version: int | None) -> Decision:
        """An operator's labels for a frame: kept only when they disagree with the model."""
        if not self._corrections:
            return Decision(Outcome.DISABLED, SampleReason.CORRECTION)
        h, w = image.shape[:2]
        if frame_is_correct(detections, labels_to_detections(labels, w, h), iou=self._iou):
            return Decision(Outcome.MODEL_AGREED, SampleReason.CORRECTION)
        return self.collect(image, frame_id, SampleReason.CORRECTION, detections, labels, model_version)

    # ------------------------------------------------------------------ the limits and the spool

    def collect(self, image: np.ndarray, frame_id: str, reason: SampleReason, detections: Sequence[Detection],
                labels: Sequence[Label] | None, model_version: int | None) -> Decision:
        """Put one frame in the spool for ``reason`` unless a repeat, a near-duplicate or a limit says no."""
        sample_id = sample_id_for(image, reason)
        with self._lock:
            # Cheapest refusals first; nothing is taken from a budget until the sample is stored,
            # so a frozen camera repeating one frame cannot starve real samples.
            if self._spool.seen(sample_id):
                return self._refuse("already_collected", Outcome.ALREADY_COLLECTED, reason, sample_id)
            if self._daily.remaining(reason.value) <= 0:
                return self._refuse("quota_exhausted", Outcome.QUOTA_EXHAUSTED, reason, sample_id,
                                    self._daily.seconds_to_reset())
            hourly = self._hourly[reason]
            if not hourly.allows() or not self._total.allows():
                return self._refuse("rate_limited", Outcome.RATE_LIMITED, reason, sample_id,
                                    max(hourly.retry_after(), self._total.retry_after()))
            phash = None
            if self._dedup is not None and self._dedup.enabled:
                phash = perceptual_hash(image)
                if self._dedup.is_duplicate(reason, phash):
                    return self._refuse("near_duplicates", Outcome.NEAR_DUPLICATE, reason, sample_id)
            try:
                stored = self._store(image, frame_id, reason, sample_id, detections, labels, model_version)
            except Exception as exc:  # sampling must never stop the line; the error is logged and counted
                log.error("collector.store_failed", reason=reason.value, frame_id=frame_id, error=str(exc))
                return self._refuse("failed", Outcome.FAILED, reason, sample_id)
            if not stored:
                # The spool refuses an id it has seen, and (logged there) a write the disk refused.
                if self._spool.seen(sample_id):
                    return self._refuse("already_collected", Outcome.ALREADY_COLLECTED, reason, sample_id)
                return self._refuse("failed", Outcome.FAILED, reason, sample_id)
            hourly.add()
            self._total.add()
            self._daily.add(reason.value)
            if phash is not None:
                self._dedup.add(reason, phash)
            self._counts["collected"][reason] += 1
            return Decision(Outcome.COLLECTED, reason, sample_id)

    def _refuse(self, counter: str, outcome: Outcome, reason: SampleReason, sample_id: str,
                retry_after: float | None = None) -> Decision:
        self._counts[counter][reason] += 1
        return Decision(outcome, reason, sample_id, retry_after)

    def _store(self, image: np.ndarray, frame_id: str, reason: SampleReason, sample_id: str,
               detections: Sequence[Detection], labels: Sequence[Label] | None, model_version: int | None) -> bool:
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self._quality])
        if not ok:
            raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
        data = encoded.tobytes()
        h, w = image.shape[:2]
        meta = {
            "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data), "width": w, "height": h,
            "reason": reason.value, "model_version": model_version, "frame_id": frame_id[:128],
            "captured_at": self._now().astimezone(UTC).isoformat(),
            "predictions": [to_box(d, w, h) for d in detections][:MAX_BOXES],
            "labels": ([Box(cls=c, cx=cx, cy=cy, w=bw, h=bh).model_dump() for c, cx, cy, bw, bh in labels][:MAX_BOXES]
                       if labels is not None else None),
        }
        return self._spool.put(sample_id, data, "image/jpeg", meta)

    # ------------------------------------------------------------------ reporting

    def counters(self) -> dict[str, dict[str, int]]:
        """Per counter, per reason (every reason present); ``used_today`` is the day's quota use."""
        with self._lock:
            out = {name: {r.value: n for r, n in counts.items()} for name, counts in self._counts.items()}
            out["used_today"] = self._daily.snapshot(r.value for r in SampleReason)
        return out

    @property
    def collected(self) -> int:
        with self._lock:
            return sum(self._counts["collected"].values())

    @property
    def rate_limited(self) -> int:
        with self._lock:
            return sum(self._counts["rate_limited"].values())
