"""Sample collection: why a frame is sent back, per-reason hourly limits and daily quotas,
near-duplicate suppression, shadow disagreements, corrections, and what lands in the spool."""

from __future__ import annotations

import hashlib
import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.collector import Outcome, ReasonLimits, SampleCollector, sample_id_for, to_box, truths_of
from edge_agent.dedup import NearDuplicateIndex
from edge_agent.inference.types import Detection
from edge_agent.settings import AgentSettings
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


def test_hourly_budget_is_enforced_and_refills(spool: Spool) -> None:
    clock = _Clock()
    c = _collector(spool, max_per_hour=3, clock=clock)
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
    # A correction's key is its own (see test_correction_of_a_frame_sent_unlabeled_is_still_collected).
    assert item.sample_id == hashlib.sha256(b"correction\0" + frame.image.tobytes()).hexdigest()[:32]
    assert item.sample_id == sample_id_for(frame.image, SampleReason.CORRECTION)
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


# --- per-reason limits, daily quota, near-duplicates, shadow disagreement, HMI corrections ----------


def _scene(seed: int) -> np.ndarray:
    """A structured scene (background + shapes): perceptual hashes of noise images are not stable."""
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.uint8)
    img[:] = rng.integers(40, 200, 3)
    for _ in range(6):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x1, y1 = int(rng.integers(0, W - 20)), int(rng.integers(0, H - 20))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x1, y1), (x1 + int(rng.integers(15, W // 2)), y1 + int(rng.integers(15, H // 2))),
                          color, -1)
        else:
            cv2.circle(img, (x1, y1), int(rng.integers(8, 40)), color, -1)
    return img


def _noisy(img: np.ndarray, seed: int, sigma: float = 5.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.int16) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


class _Wall:
    def __init__(self, when: datetime) -> None:
        self.when = when

    def __call__(self) -> datetime:
        return self.when


LOW = _det(conf=0.4)  # inside the (0.3, 0.6) band of _collector
R = SampleReason


def test_per_reason_hourly_limit_leaves_other_reasons_alone(spool: Spool) -> None:
    clock = _Clock()
    c = _collector(spool, low_confidence=True, clock=clock, limits={R.LOW_CONFIDENCE: ReasonLimits(2, 100)})
    got = []
    for seed in range(4):
        got.append(c.consider(_frame(seed), [LOW], model_version=1))
        clock.t += 60
    assert got == [True, True, False, False]
    assert c.consider(_frame(10, labels=[LABEL]), [], model_version=1)  # corrections have their own budget
    decision = c.collect(_image(20), "x", R.LOW_CONFIDENCE, [LOW], None, 1)
    assert decision.outcome is Outcome.RATE_LIMITED
    assert decision.retry_after_s == pytest.approx(3600 - 4 * 60)  # until the first sample is an hour old
    counts = c.counters()
    assert counts["collected"] == {"correction": 1, "low_confidence": 2, "shadow_disagreement": 0, "random": 0}
    assert counts["rate_limited"]["low_confidence"] == 3 and counts["rate_limited"]["correction"] == 0
    clock.t += 3600 - 4 * 60
    assert c.consider(_frame(30), [LOW], model_version=1)


def test_overall_hourly_cap_spans_reasons(spool: Spool) -> None:
    c = _collector(spool, low_confidence=True, max_per_hour=2)
    assert c.consider(_frame(0), [LOW], model_version=1)
    assert c.consider(_frame(1, labels=[LABEL]), [], model_version=1)
    assert not c.consider(_frame(2, labels=[LABEL]), [], model_version=1)
    assert c.counters()["rate_limited"]["correction"] == 1


def test_daily_quota_holds_across_restart_and_resets_at_utc_midnight(spool: Spool, tmp_path: Path) -> None:
    path = tmp_path / "quota.json"
    wall = _Wall(datetime(2025, 3, 1, 23, 0, tzinfo=UTC))
    limits = {R.CORRECTION: ReasonLimits(1000, 2), R.LOW_CONFIDENCE: ReasonLimits(1000, 5)}
    first = _collector(spool, low_confidence=True, limits=limits, quota_path=path, now=wall)
    assert first.consider(_frame(0, labels=[LABEL]), [], model_version=1)
    assert first.consider(_frame(1, labels=[LABEL]), [], model_version=1)
    decision = first.collect(_image(2), "f2", R.CORRECTION, [], [LABEL], 1)
    assert decision.outcome is Outcome.QUOTA_EXHAUSTED and decision.retry_after_s == pytest.approx(3600)
    assert first.consider(_frame(3), [LOW], model_version=1)  # another reason's quota is its own
    assert first.counters()["quota_exhausted"]["correction"] == 1

    restarted = _collector(spool, low_confidence=True, limits=limits, quota_path=path, now=wall)
    assert restarted.counters()["used_today"] == {"correction": 2, "low_confidence": 1,
                                                   "shadow_disagreement": 0, "random": 0}
    assert not restarted.consider(_frame(4, labels=[LABEL]), [], model_version=1)
    assert restarted.counters()["quota_exhausted"]["correction"] == 1

    wall.when += timedelta(hours=1, seconds=1)  # 00:00:01 UTC, March 2nd
    assert restarted.consider(_frame(5, labels=[LABEL]), [], model_version=1)
    next_day = _collector(spool, low_confidence=True, limits=limits, quota_path=path, now=wall)
    assert next_day.counters()["used_today"]["correction"] == 1
    assert next_day.counters()["used_today"]["low_confidence"] == 0
    assert spool.depth() == 4


def test_near_duplicate_is_dropped_without_using_the_budget(spool: Spool) -> None:
    c = _collector(spool, low_confidence=True, max_per_hour=2, dedup=NearDuplicateIndex(24, 16))
    scene = _scene(1)
    assert c.consider(Frame("a", scene), [LOW], model_version=1)
    for k in range(3):  # the same scene, other sensor noise: other pixels, same picture
        assert not c.consider(Frame(f"a{k}", _noisy(scene, k)), [LOW], model_version=1)
    assert c.consider(Frame("b", _scene(2)), [LOW], model_version=1)  # a new scene still fits the budget
    counts = c.counters()
    assert counts["near_duplicates"]["low_confidence"] == 3
    assert counts["rate_limited"]["low_confidence"] == 0
    assert spool.depth() == 2


def test_correction_is_kept_beside_unlabeled_samples_of_its_scene_but_not_twice(spool: Spool) -> None:
    c = _collector(spool, low_confidence=True, dedup=NearDuplicateIndex(24, 16))
    scene = _scene(3)
    assert c.consider(Frame("unlabeled", scene), [LOW], model_version=1)
    wrong = [_det(cls=0)]  # the label says class 1
    assert c.consider(Frame("corr-1", _noisy(scene, 1), [LABEL]), wrong, model_version=1)
    assert not c.consider(Frame("corr-2", _noisy(scene, 2), [LABEL]), wrong, model_version=1)
    # An unlabeled sample adds nothing beside a correction of its scene.
    d = c.collect(_noisy(scene, 3), "rand", R.RANDOM, [], None, 1)
    assert d.outcome is Outcome.NEAR_DUPLICATE
    counts = c.counters()
    assert counts["collected"]["correction"] == 1 and counts["near_duplicates"]["correction"] == 1
    assert counts["near_duplicates"]["random"] == 1


def test_correction_of_a_frame_sent_unlabeled_is_still_collected(spool: Spool) -> None:
    c = _collector(spool, low_confidence=True)
    frame = _frame(4)
    assert c.consider(frame, [LOW], model_version=1)
    other_class = (0, *LABEL[1:])  # the operator says the low-confidence box is class 0
    decision = c.submit_correction(frame.image, frame.frame_id, [other_class], [LOW], 1)
    assert decision.collected and decision.sample_id == sample_id_for(frame.image, R.CORRECTION)
    assert decision.sample_id != sample_id_for(frame.image, R.LOW_CONFIDENCE)
    again = c.submit_correction(frame.image, frame.frame_id, [other_class], [LOW], 1)  # a retried post
    assert again.outcome is Outcome.ALREADY_COLLECTED and again.sample_id == decision.sample_id
    assert spool.depth() == 2 and c.counters()["already_collected"]["correction"] == 1


def test_submit_correction_keeps_only_disagreements(spool: Spool) -> None:
    c = _collector(spool)
    img = _image(5)
    right = [_det(box=(61, 46, 101, 76))]
    assert c.submit_correction(img, "f", [LABEL], right, 2).outcome is Outcome.MODEL_AGREED
    assert spool.depth() == 0
    decision = c.submit_correction(img, "f", [LABEL, (0, 0.1, 0.1, 0.1, 0.1)], right, 2)
    assert decision.collected and decision.reason is R.CORRECTION
    meta = spool.next_due().meta
    assert meta["reason"] == "correction" and meta["model_version"] == 2
    assert [Box.model_validate(b).cls for b in meta["labels"]] == [1, 0]
    assert len(meta["predictions"]) == 1
    off = _collector(spool, corrections=False)
    assert off.submit_correction(_image(6), "g", [LABEL], [], 2).outcome is Outcome.DISABLED


def test_consider_disagreement_collects_frames_where_the_models_disagree(spool: Spool) -> None:
    c = _collector(spool)
    a = _det(cls=1)
    b = _det(cls=2, box=(0, 0, 30, 30))
    assert c.consider_disagreement(_image(1), "s1", [a], [a], 3, 4).outcome is Outcome.NO_REASON
    assert c.consider_disagreement(_image(1), "s1", [], [], 3, 4).outcome is Outcome.NO_REASON
    weak = _det(conf=0.1)  # below the agreement's confidence floor: not a disagreement
    assert c.consider_disagreement(_image(1), "s1", [weak], [], 3, 4).outcome is Outcome.NO_REASON
    decision = c.consider_disagreement(_image(2), "s2", [a, b], [a], 3, 4)
    assert decision.collected and decision.reason is R.SHADOW_DISAGREEMENT
    meta = spool.next_due().meta
    assert meta["reason"] == "shadow_disagreement" and meta["labels"] is None and meta["model_version"] == 3
    assert sorted(Box.model_validate(p).cls for p in meta["predictions"]) == [1, 2]  # the active model's
    # With a looser threshold a mostly-agreeing frame (2 of 3 confident boxes paired) is not collected.
    loose = _collector(spool, disagreement_below=0.5)
    assert loose.consider_disagreement(_image(3), "s3", [a, b], [a], 3, 4).outcome is Outcome.NO_REASON
    assert loose.consider_disagreement(_image(3), "s3", [a], [b], 3, 4).collected
    off = _collector(spool, shadow_disagreement=False)
    assert off.consider_disagreement(_image(4), "s4", [a], [], 3, 4).outcome is Outcome.DISABLED


def test_consider_disagreement_is_thread_safe_under_its_limits(spool: Spool) -> None:
    limit = 25
    c = _collector(spool, limits={R.SHADOW_DISAGREEMENT: ReasonLimits(limit, 1000)},
                   dedup=NearDuplicateIndex(24, 256))
    shared = _scene(999)
    results: list[Outcome] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def shadow_thread(k: int) -> None:
        try:
            start.wait()
            for i in range(15):
                # Distinct scenes, plus every thread sending its own noisy copy of one shared scene.
                img = _scene(1000 * k + i) if i else _noisy(shared, k)
                d = c.consider_disagreement(img, f"t{k}-{i}", [_det()], [], 1, 2)
                with lock:
                    results.append(d.outcome)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=shadow_thread, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    counts = c.counters()
    assert results.count(Outcome.COLLECTED) == limit == counts["collected"]["shadow_disagreement"]
    assert spool.depth() == limit
    assert counts["used_today"]["shadow_disagreement"] == limit
    assert len(results) == 90
    assert counts["collected"]["shadow_disagreement"] + counts["rate_limited"]["shadow_disagreement"] + \
        counts["near_duplicates"]["shadow_disagreement"] == 90


def test_concurrent_copies_of_one_scene_are_collected_once(spool: Spool) -> None:
    c = _collector(spool, dedup=NearDuplicateIndex(24, 16))
    scene = _scene(7)
    outcomes: list[Outcome] = []
    start = threading.Barrier(8)

    def post(k: int) -> None:
        start.wait()
        outcomes.append(c.consider_disagreement(_noisy(scene, k), f"f{k}", [_det()], [], 1, 2).outcome)

    threads = [threading.Thread(target=post, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == sorted([Outcome.COLLECTED] + [Outcome.NEAR_DUPLICATE] * 7)
    assert spool.depth() == 1


def test_counters_list_every_reason(spool: Spool) -> None:
    counts = _collector(spool).counters()
    assert set(counts) == {"collected", "already_collected", "near_duplicates", "rate_limited",
                           "quota_exhausted", "failed", "used_today"}
    assert all(set(v) == {r.value for r in SampleReason} for v in counts.values())
    assert all(n == 0 for v in counts.values() for n in v.values())


def test_a_failing_spool_is_counted_not_raised_and_uses_no_budget(spool: Spool, monkeypatch) -> None:
    c = _collector(spool, max_per_hour=1)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(spool, "put", broken)
    assert not c.consider(_frame(1, labels=[LABEL]), [], model_version=1)
    assert c.counters()["failed"]["correction"] == 1
    monkeypatch.undo()
    assert c.consider(_frame(2, labels=[LABEL]), [], model_version=1)


def test_configure_applies_a_sampling_command(spool: Spool) -> None:
    c = _collector(spool, random_rate=0.0, max_per_hour=1000)
    assert c.reason_for(_frame(), []) is None
    c.configure(random_rate=1.0, max_per_hour=1)
    assert c.reason_for(_frame(), []) is SampleReason.RANDOM
    assert c.consider(_frame(1), [], model_version=1)
    assert not c.consider(_frame(2), [], model_version=1)
    c.configure(low_band=(0.0, 1.0))
    assert c._low_band == (0.0, 1.0)


def test_from_settings_uses_the_sample_collection_settings(spool: Spool, tmp_path: Path) -> None:
    settings = AgentSettings(device_id="cam-1", random_rate=1.0, random_max_per_hour=2, random_max_per_day=1,
                             dedup_window=0, collect_shadow_disagreement=False)
    c = SampleCollector.from_settings(spool, settings, tmp_path / "quota.json")
    assert c.consider(_frame(1), [], model_version=1)
    assert not c.consider(_frame(2), [], model_version=1)
    assert c.counters()["quota_exhausted"]["random"] == 1
    assert (tmp_path / "quota.json").exists()
    assert c.consider_disagreement(_image(3), "s", [_det()], [], 1, 2).outcome is Outcome.DISABLED
