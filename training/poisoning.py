"""Poisoning defense: which source devices label unlike the production model and unlike the fleet.

Two signals per device, over its labeled samples in a batch:

- *confident contradictions*: the share of samples on which the production model made a
  confident detection that none of the device's labels confirms (same class, IoU >= 0.5).
  Honest corrections mostly add what the model missed or fix low-confidence guesses; a device
  whose labels keep overruling confident detections is flipping or erasing labels.
- *class divergence*: the Jensen-Shannon distance between the device's label class histogram
  and that of every other device together (scipy), which catches a device that relabels a
  class wholesale even where the model is unsure.

A device beyond either threshold (with enough samples to judge) is quarantined. Pure logic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.spatial.distance import jensenshannon


@dataclass(frozen=True)
class PoisoningPolicy:
    confident: float = 0.7
    iou: float = 0.5
    max_contradiction_rate: float = 0.3
    max_class_divergence: float = 0.5
    min_samples: int = 20


@dataclass(frozen=True)
class LabeledSample:
    device_id: str
    labels: Sequence[dict]
    predictions: Sequence[dict]


@dataclass
class DeviceVerdict:
    device_id: str
    samples: int
    contradiction_rate: float
    class_divergence: float | None
    quarantine: bool
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _xyxy(boxes: Sequence[dict]) -> np.ndarray:
    a = np.array([[b["cx"], b["cy"], b["w"], b["h"]] for b in boxes], dtype=np.float64).reshape(-1, 4)
    return np.concatenate([a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2], axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def contradicts(sample: LabeledSample, policy: PoisoningPolicy) -> bool:
    """True when a confident prediction has no label of the same class at IoU >= policy.iou."""
    confident = [p for p in sample.predictions if p.get("conf", 0.0) >= policy.confident]
    if not confident:
        return False
    if not sample.labels:
        return True  # the label says "nothing here" against a confident detection
    ious = _iou(_xyxy(confident), _xyxy(sample.labels))
    for i, pred in enumerate(confident):
        same = [j for j, lab in enumerate(sample.labels) if lab["cls"] == pred["cls"]]
        if not same or ious[i, same].max() < policy.iou:
            return True
    return False


def assess_devices(samples: Iterable[LabeledSample], n_classes: int,
                   policy: PoisoningPolicy = PoisoningPolicy()) -> dict[str, DeviceVerdict]:
    by_device: dict[str, list[LabeledSample]] = defaultdict(list)
    for s in samples:
        by_device[s.device_id].append(s)
    hist = {d: np.bincount([int(b["cls"]) for s in ss for b in s.labels if 0 <= int(b["cls"]) < n_classes],
                           minlength=n_classes).astype(float)
            for d, ss in by_device.items()}
    verdicts = {}
    for device, ss in sorted(by_device.items()):
        rate = sum(contradicts(s, policy) for s in ss) / len(ss)
        others = sum((h for d, h in hist.items() if d != device), np.zeros(n_classes))
        divergence = None
        if others.sum() and hist[device].sum():
            divergence = float(jensenshannon(hist[device], others, base=2))
        verdict = DeviceVerdict(device, len(ss), round(rate, 4),
                                None if divergence is None else round(divergence, 4), False)
        if len(ss) >= policy.min_samples:
            if rate > policy.max_contradiction_rate:
                verdict.reasons.append(
                    f"labels overrule {rate:.0%} of the production model's confident detections "
                    f"(threshold {policy.max_contradiction_rate:.0%})")
            if divergence is not None and divergence > policy.max_class_divergence:
                verdict.reasons.append(
                    f"label class mix diverges from the other devices' (Jensen-Shannon distance "
                    f"{divergence:.2f}, threshold {policy.max_class_divergence:.2f})")
            verdict.quarantine = bool(verdict.reasons)
        verdicts[device] = verdict
    return verdicts
