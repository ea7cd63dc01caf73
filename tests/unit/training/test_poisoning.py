"""Poisoning defense: a device that flips labels against the model or the fleet is quarantined."""

from __future__ import annotations

import random

from training.poisoning import LabeledSample, PoisoningPolicy, assess_devices, contradicts


def _box(cls: int, cx: float, cy: float, conf: float | None = None) -> dict:
    box = {"cls": cls, "cx": cx, "cy": cy, "w": 0.1, "h": 0.1}
    if conf is not None:
        box["conf"] = conf
    return box


def _honest(device: str, n: int, rng: random.Random) -> list[LabeledSample]:
    out = []
    for _ in range(n):
        cls, cx, cy = rng.randrange(3), rng.uniform(.2, .8), rng.uniform(.2, .8)
        # The model either saw it confidently and right, or missed it / was unsure: a real correction.
        preds = [_box(cls, cx + 0.005, cy, 0.9)] if rng.random() < 0.5 else [_box(cls, cx, cy, 0.3)]
        out.append(LabeledSample(device, [_box(cls, cx, cy)], preds))
    return out


def test_contradiction_rules() -> None:
    policy = PoisoningPolicy()
    label = [_box(0, .5, .5)]
    assert not contradicts(LabeledSample("d", label, [_box(0, .5, .5, 0.95)]), policy)
    assert contradicts(LabeledSample("d", label, [_box(1, .5, .5, 0.95)]), policy)  # class flipped
    assert contradicts(LabeledSample("d", [], [_box(1, .5, .5, 0.95)]), policy)  # erased
    assert contradicts(LabeledSample("d", [_box(0, .1, .1)], [_box(0, .5, .5, 0.95)]), policy)  # moved
    assert not contradicts(LabeledSample("d", label, [_box(1, .5, .5, 0.4)]), policy)  # model unsure


def test_a_label_flipping_device_is_quarantined_and_honest_ones_are_not() -> None:
    rng = random.Random(0)
    samples = _honest("cam-1", 60, rng) + _honest("cam-2", 60, rng)
    for s in _honest("cam-evil", 60, rng):
        flipped = [dict(b, cls=(b["cls"] + 1) % 3) for b in s.labels]
        samples.append(LabeledSample("cam-evil", flipped, s.predictions))
    verdicts = assess_devices(samples, 3)
    assert not verdicts["cam-1"].quarantine and not verdicts["cam-2"].quarantine
    assert verdicts["cam-evil"].quarantine
    assert verdicts["cam-evil"].contradiction_rate > 0.3
    assert "overrule" in verdicts["cam-evil"].reasons[0]


def test_a_device_relabelling_a_class_wholesale_diverges_from_the_fleet() -> None:
    rng = random.Random(1)
    samples = _honest("cam-1", 80, rng) + _honest("cam-2", 80, rng)
    # Everything labeled "stain" where the model was unsure: no confident contradiction to see.
    samples += [LabeledSample("cam-odd", [_box(2, .5, .5)], [_box(0, .5, .5, 0.3)]) for _ in range(40)]
    verdicts = assess_devices(samples, 3, PoisoningPolicy(max_class_divergence=0.5))
    assert verdicts["cam-odd"].contradiction_rate == 0
    assert verdicts["cam-odd"].quarantine
    assert "Jensen-Shannon" in verdicts["cam-odd"].reasons[0]
    assert not verdicts["cam-1"].quarantine


def test_too_few_samples_are_reported_but_not_judged() -> None:
    samples = [LabeledSample("cam-new", [_box(1, .5, .5)], [_box(0, .5, .5, 0.95)]) for _ in range(5)]
    verdict = assess_devices(samples, 3, PoisoningPolicy(min_samples=20))["cam-new"]
    assert verdict.contradiction_rate == 1.0
    assert not verdict.quarantine
    assert verdict.class_divergence is None
