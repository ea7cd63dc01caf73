"""Sample collection: why a frame is sent back, the hourly budget, and what lands in the spool."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import cv2
import numpy as np
import pytest

import edge_agent.collector as collector_mod
from edge_agent.collector import SampleCollector, to_box, truths_of
from edge_agent.inference.types import Detection
from edge_agent.sources import Frame
from edge_agent.spool import Spool
from protocol.messages import Box, SampleReason

W, H = 160, 120
LABEL = (1, 0.5, 0.5, 0.25, 0.25)  # class 1, centred, 40x30 px


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(H, W, 3), dtype=np.uint8)


def _frame(seed: int = 0, labels=None, frame_id: str | None = None) -> Frame:
    return Frame(frame_id or f"frame-{seed}", _image(seed), labels)


def _det(cls: int = 1, conf: float = 0.9, box=(60, 45, 100, 75)) -> Detection:
    return Detection(cls, conf, *box)


@pytest.fixture
def spool(tmp_path: Path):
    s = Spool(tmp_path / "spool", max_bytes=50_000_000)
    yield s
    s.close()


def _collector(spool: Spool, **overrides) -> SampleCollector:
    opts = dict(corrections=True, low_confidence=False, low_band=(0.3, 0.6), random_rate=0.0,
                max_per_hour=1000, jpeg_quality=90, rng=random.Random(0))
    opts.update(overrides)
    return SampleCollector(spool, **opts)


# --- reason_for -------------------------------------------------------------------------------------


def test_truths_of_converts_labels_to_pixels() -> None:
    assert truths_of(_frame()) is None
    (truth,) = truths_of(_frame(labels=[LABEL]))
    assert truth.cls == 1
    assert truth.xyxy == pytest.approx((60, 45, 100, 75))


def test_correction_when_prediction_is_missing(spool: Spool) -> None:
    c = _collector(spool)
    assert c.reason_for(_frame(labels=[LABEL]), []) is SampleReason.CORRECTION


def test_correction_when_class_is_wrong(spool: Spool) -> None:
    c = _collector(spool)
    assert c.reason_for(_frame(labels=[LABEL]), [_det(cls=0)]) is SampleReason.CORRECTION


def test_correction_when_there_is_an_extra_prediction(spool: Spool) -> None:
    c = _collector(spool)
    extra = _det(cls=1, box=(0, 0, 20, 20))
    assert c.reason_for(_frame(labels=[LABEL]), [_det(), extra]) is SampleReason.CORRECTION


def test_correction_when_box_is_badly_placed(spool: Spool) -> None:
    c = _collector(spool)
    assert c.reason_for(_frame(labels=[LABEL]), [_det(box=(90, 70, 130, 100))]) is SampleReason.CORRECTION


def test_no_reason_when_predictions_agree_with_labels(spool: Spool) -> None:
    c = _collector(spool)
    assert c.reason_for(_frame(labels=[LABEL]), [_det(box=(61, 46, 101, 76))]) is None
    assert c.reason_for(_frame(labels=[]), []) is None  # an empty, correct frame


def test_no_correction_without_labels_or_when_disabled(spool: Spool) -> None:
    assert _collector(spool).reason_for(_frame(labels=None), [_det()]) is None
    assert _collector(spool, corrections=False).reason_for(_frame(labels=[LABEL]), []) is None


@pytest.mark.parametrize(("conf", "expected"), [(0.3, True), (0.45, True), (0.5999, True), (0.6, False),
                                                 (0.29, False), (0.95, False)])
def test_low_confidence_band_is_half_open(spool: Spool, conf: float, expected: bool) -> None:
    c = _collector(spool, low_confidence=True)
    reason = c.reason_for(_frame(), [_det(conf=0.9), _det(conf=conf, box=(0, 0, 10, 10))])
    assert (reason is SampleReason.LOW_CONFIDENCE) is expected


def test_low_confidence_disabled(spool: Spool) -> None:
    assert _collector(spool, low_confidence=False).reason_for(_frame(), [_det(conf=0.4)]) is None


def test_correction_takes_precedence_over_low_confidence(spool: Spool) -> None:
    c = _collector(spool, low_confidence=True)
    assert c.reason_for(_frame(labels=[LABEL]), [_det(cls=0, conf=0.4)]) is SampleReason.CORRECTION


def test_random_rate_follows_the_seeded_rng(spool: Spool) -> None:
    c = _collector(spool, random_rate=0.25, rng=random.Random(1234))
    got = [c.reason_for(_frame(), []) is SampleReason.RANDOM for _ in range(2000)]
    ref = random.Random(1234)
    assert got == [ref.random() < 0.25 for _ in range(2000)]
    assert 400 < sum(got) < 600
    assert all(r in (None, SampleReason.RANDOM) for r in [c.reason_for(_frame(), []) for _ in range(10)])


def test_random_rate_zero_and_one(spool: Spool) -> None:
    never = _collector(spool, random_rate=0.0)
    always = _collector(spool, random_rate=1.0)
    assert all(never.reason_for(_frame(), []) is None for _ in range(200))
    assert all(always.reason_for(_frame(), []) is SampleReason.RANDOM for _ in range(200))


# --- consider / budget --------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 10_000.0

    def __call__(self) -> float:
        return self.t


def test_hourly_budget_is_enforced_and_refills(spool: Spool, monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(collector_mod.time, "monotonic", clock)
    c = _collector(spool, max_per_hour=3)
    results = []
    for seed in range(5):
        results.append(c.consider(_frame(seed, labels=[LABEL]), [], model_version=1))
        clock.t += 60
    assert results == [True, True, True, False, False]
    assert c.collected == 3 and c.rate_limited == 2
    assert spool.depth() == 3
    clock.t = 10_000.0 + 3600 + 1  # only the first sample is now more than an hour old
    assert c.consider(_frame(10, labels=[LABEL]), [], model_version=1)
    assert not c.consider(_frame(11, labels=[LABEL]), [], model_version=1)
    assert c.collected == 4


def test_frames_without_reason_do_not_touch_spool_or_budget(spool: Spool) -> None:
    c = _collector(spool, max_per_hour=1)
    assert not c.consider(_frame(labels=[LABEL]), [_det()], model_version=1)
    assert spool.depth() == 0 and c.rate_limited == 0
    assert c.consider(_frame(2, labels=[LABEL]), [], model_version=1)


def test_consider_writes_jpeg_and_meta(spool: Spool) -> None:
    c = _collector(spool, jpeg_quality=95)
    frame = _frame(7, labels=[LABEL], frame_id="cam1-000042")
    dets = [_det(cls=0, conf=0.87654321)]
    assert c.consider(frame, dets, model_version=5)
    item = spool.next_due()
    data = item.path.read_bytes()
    assert data[:3] == b"\xff\xd8\xff"  # JPEG magic
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (H, W, 3)
    assert item.content_type == "image/jpeg"
    assert item.sample_id == hashlib.sha256(frame.image.tobytes()).hexdigest()[:32]
    meta = item.meta
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["size_bytes"] == len(data)
    assert (meta["width"], meta["height"]) == (W, H)
    assert meta["reason"] == "correction"
    assert meta["model_version"] == 5
    assert meta["frame_id"] == "cam1-000042"
    assert meta["labels"] == [Box(cls=1, cx=0.5, cy=0.5, w=0.25, h=0.25).model_dump()]
    (pred,) = meta["predictions"]
    assert Box.model_validate(pred) == Box(cls=0, cx=0.5, cy=0.5, w=0.25, h=0.25, conf=0.8765)
    assert meta["captured_at"].endswith("+00:00")


def test_unlabelled_sample_has_none_labels_and_clamped_predictions(spool: Spool) -> None:
    c = _collector(spool, low_confidence=True)
    det = Detection(2, 0.4, -20, -10, 40, 30)  # partly outside the frame
    assert c.consider(_frame(3), [det], model_version=None)
    meta = spool.next_due().meta
    assert meta["labels"] is None and meta["reason"] == "low_confidence" and meta["model_version"] is None
    box = Box.model_validate(meta["predictions"][0])
    assert all(0.0 <= v <= 1.0 for v in (box.cx, box.cy, box.w, box.h))


def test_same_pixels_are_refused_twice(spool: Spool) -> None:
    c = _collector(spool)
    assert c.consider(_frame(1, labels=[LABEL], frame_id="a"), [], model_version=1)
    assert not c.consider(_frame(1, labels=[LABEL], frame_id="b"), [], model_version=1)
    spool.mark_sent(spool.next_due().sample_id)
    assert not c.consider(_frame(1, labels=[LABEL], frame_id="c"), [], model_version=1)
    assert c.collected == 1


def test_repeated_frame_does_not_use_up_the_budget(spool: Spool) -> None:
    # A frozen camera repeats one frame; those repeats must not starve real samples.
    c = _collector(spool, max_per_hour=2)
    assert c.consider(_frame(1, labels=[LABEL]), [], model_version=1)
    for _ in range(5):
        assert not c.consider(_frame(1, labels=[LABEL]), [], model_version=1)
    assert c.consider(_frame(2, labels=[LABEL]), [], model_version=1)
    assert c.rate_limited == 0
    assert not c.consider(_frame(3, labels=[LABEL]), [], model_version=1)
    assert c.rate_limited == 1


def test_to_box_normalises_and_rounds() -> None:
    box = to_box(Detection(3, 0.123456, 0, 0, 80, 60), W, H)
    assert box == {"cls": 3, "cx": 0.25, "cy": 0.25, "w": 0.5, "h": 0.5, "conf": 0.1235}
