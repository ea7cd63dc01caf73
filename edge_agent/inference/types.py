"""Value types shared by every inference backend.

A :class:`Detection` is always expressed in pixels of the ORIGINAL frame the
caller passed in (never the letterboxed model input), so it can be drawn,
matched against labels or sent upstream without knowing the model's input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object: class id, confidence and an xyxy box in original-image pixels."""

    cls: int
    conf: float
    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def to_yolo(self, img_w: int, img_h: int) -> tuple[float, float, float, float]:
        """Normalised YOLO ``(cx, cy, w, h)`` for an image of ``img_w`` x ``img_h`` pixels."""
        if img_w <= 0 or img_h <= 0:
            raise ValueError(f"image size must be positive, got {img_w}x{img_h}")
        return (
            (self.x1 + self.x2) / 2 / img_w,
            (self.y1 + self.y2) / 2 / img_h,
            (self.x2 - self.x1) / img_w,
            (self.y2 - self.y1) / img_h,
        )

    @classmethod
    def from_yolo(
        cls,
        class_id: int,
        cx: float,
        cy: float,
        w: float,
        h: float,
        img_w: int,
        img_h: int,
        conf: float = 1.0,
    ) -> Detection:
        """Build a detection from normalised YOLO ``(cx, cy, w, h)`` (a label line, for instance)."""
        if img_w <= 0 or img_h <= 0:
            raise ValueError(f"image size must be positive, got {img_w}x{img_h}")
        return cls(
            cls=int(class_id),
            conf=float(conf),
            x1=(cx - w / 2) * img_w,
            y1=(cy - h / 2) * img_h,
            x2=(cx + w / 2) * img_w,
            y2=(cy + h / 2) * img_h,
        )


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """Detections for one frame and the wall time of the whole pipeline (pre + model + post)."""

    detections: tuple[Detection, ...]
    latency_ms: float


def detections_to_arrays(dets: Sequence[Detection]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes (N, 4) float64 xyxy, conf (N,) float64, cls (N,) int64)`` for a list of detections."""
    n = len(dets)
    boxes = np.empty((n, 4), dtype=np.float64)
    conf = np.empty(n, dtype=np.float64)
    cls = np.empty(n, dtype=np.int64)
    for i, d in enumerate(dets):
        boxes[i] = (d.x1, d.y1, d.x2, d.y2)
        conf[i] = d.conf
        cls[i] = d.cls
    return boxes, conf, cls
