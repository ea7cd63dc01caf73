"""Post-switch health check. Pure logic: frames in, a verdict out; no I/O, no clock.

The live model's recent frames are summarised continuously (``BaselineWindow``). When a new
model takes over, that summary is frozen into the update record, and the new model's first
frames are judged against it (``HealthMonitor``): too many inference errors, or a collapse of
its confidence or of how often it detects anything compared with the model it replaced, and
the switch is rolled back. The verdict says why, in words an operator can act on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class HealthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window_frames: int = Field(50, ge=1, description="frames the new model serves before it is judged")
    max_error_rate: float = Field(0.1, ge=0, le=1, description="share of frames allowed to fail")
    # Collapse = the new model's figure below this share of the old model's figure.
    min_confidence_ratio: float = Field(0.5, ge=0, le=1)
    min_detection_rate_ratio: float = Field(0.5, ge=0, le=1)
    # A baseline from fewer frames, or with almost no detections, says too little to compare.
    min_baseline_frames: int = Field(20, ge=1)
    min_baseline_detection_rate: float = Field(0.05, ge=0, le=1)


class HealthBaseline(BaseModel):
    """What the replaced model did on its last frames; persisted with the update."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int | None = None
    frames: int = Field(0, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    detection_rate: float = Field(0.0, ge=0, le=1)
    # Mean over frames with detections of the highest box confidence.
    mean_top_confidence: float = Field(0.0, ge=0, le=1)


@dataclass(frozen=True)
class FrameOutcome:
    ok: bool
    top_confidence: float | None = None  # None: the frame had no detection (or failed)

    @classmethod
    def of(cls, confidences: Iterable[float | None]) -> FrameOutcome:
        values = [c for c in confidences if c is not None]
        return cls(ok=True, top_confidence=max(values) if values else None)

    @classmethod
    def error(cls) -> FrameOutcome:
        return cls(ok=False)


class _Tally:
    def __init__(self) -> None:
        self.frames = self.errors = self.detected = 0
        self.confidence_sum = 0.0

    def add(self, outcome: FrameOutcome, sign: int = 1) -> None:
        self.frames += sign
        if not outcome.ok:
            self.errors += sign
        elif outcome.top_confidence is not None:
            self.detected += sign
            self.confidence_sum += sign * outcome.top_confidence

    @property
    def served(self) -> int:
        return self.frames - self.errors

    def detection_rate(self) -> float:
        return self.detected / self.served if self.served else 0.0

    def mean_top_confidence(self) -> float:
        return self.confidence_sum / self.detected if self.detected else 0.0

    def error_rate(self) -> float:
        return self.errors / self.frames if self.frames else 0.0


class BaselineWindow:
    """Rolling summary of the live model's last ``size`` frames."""

    def __init__(self, size: int = 200) -> None:
        self._outcomes: deque[FrameOutcome] = deque()
        self._size = size
        self._tally = _Tally()

    def add(self, outcome: FrameOutcome) -> None:
        self._outcomes.append(outcome)
        self._tally.add(outcome)
        if len(self._outcomes) > self._size:
            self._tally.add(self._outcomes.popleft(), sign=-1)

    def clear(self) -> None:
        self._outcomes.clear()
        self._tally = _Tally()

    def snapshot(self, version: int | None) -> HealthBaseline:
        t = self._tally
        return HealthBaseline(version=version, frames=t.frames, error_rate=round(t.error_rate(), 6),
                              detection_rate=round(t.detection_rate(), 6),
                              mean_top_confidence=round(min(t.mean_top_confidence(), 1.0), 6))


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str


class HealthMonitor:
    """Judges a freshly switched model over its first ``window_frames`` frames.

    ``observe`` returns None while undecided, then one ``Verdict``. Errors fail it early, as
    soon as the window can no longer stay under the allowed rate: a model that cannot serve
    should not keep the line waiting for the rest of the window.
    """

    def __init__(self, settings: HealthSettings, baseline: HealthBaseline | None, version: int) -> None:
        self.settings = settings
        self.baseline = baseline
        self.version = version
        self._tally = _Tally()
        self.verdict: Verdict | None = None

    @property
    def frames(self) -> int:
        return self._tally.frames

    def observe(self, outcome: FrameOutcome) -> Verdict | None:
        if self.verdict is not None:
            return self.verdict
        self._tally.add(outcome)
        s, t = self.settings, self._tally
        allowed_errors = int(s.max_error_rate * s.window_frames)
        if t.errors > allowed_errors:
            self.verdict = Verdict(False, f"version {self.version} failed {t.errors} of its first {t.frames} "
                                          f"frames (at most {allowed_errors} of {s.window_frames} allowed)")
        elif t.frames >= s.window_frames:
            self.verdict = self._judge()
        return self.verdict

    def _judge(self) -> Verdict:
        s, t, base = self.settings, self._tally, self.baseline
        figures = (f"detection rate {t.detection_rate():.2f}, mean top confidence {t.mean_top_confidence():.2f} "
                   f"over {t.frames} frames")
        comparable = (base is not None and base.frames >= s.min_baseline_frames
                      and base.detection_rate >= s.min_baseline_detection_rate)
        if not comparable:
            why = ("no previous model to compare with" if base is None or base.frames == 0
                   else f"baseline of {base.frames} frames too thin to compare")
            return Verdict(True, f"version {self.version} healthy: {t.errors} errors, {figures} ({why})")
        old = f"version {base.version}" if base.version is not None else "the previous model"
        if t.detection_rate() < s.min_detection_rate_ratio * base.detection_rate:
            return Verdict(False, f"detection rate collapsed: version {self.version} detected objects in "
                                  f"{t.detection_rate():.0%} of {t.served} frames, {old} in "
                                  f"{base.detection_rate:.0%} of its last {base.frames}")
        if t.mean_top_confidence() < s.min_confidence_ratio * base.mean_top_confidence:
            return Verdict(False, f"confidence collapsed: version {self.version} mean top confidence "
                                  f"{t.mean_top_confidence():.2f}, {old} {base.mean_top_confidence:.2f} "
                                  f"(at least {s.min_confidence_ratio:.0%} of it required)")
        return Verdict(True, f"version {self.version} healthy: {t.errors} errors, {figures} "
                             f"(previous: detection rate {base.detection_rate:.2f}, "
                             f"mean top confidence {base.mean_top_confidence:.2f})")
