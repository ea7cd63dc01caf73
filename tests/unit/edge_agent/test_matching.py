"""Box matching, frame correctness, agreement between two models."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.inference.types import Detection
from edge_agent.matching import (
    agreement,
    agreement_counts,
    confident_agreement_counts,
    frame_accuracy,
    frame_is_correct,
    iou_matrix,
    match,
)


def det(x1, y1, x2, y2, cls=0, conf=0.9):
    return Detection(cls=cls, conf=conf, x1=x1, y1=y1, x2=x2, y2=y2)


# --- iou_matrix ---------------------------------------------------------------------------------------


def test_iou_matrix_values_and_shape():
    a = np.array([[0, 0, 10, 10], [0, 0, 20, 20]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110]])
    m = iou_matrix(a, b)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m[0], [1.0, 50 / 150, 0.0])
    np.testing.assert_allclose(m[1], [100 / 400, 100 / 400, 0.0])
    np.testing.assert_allclose(iou_matrix(b, a), m.T)


def test_iou_matrix_empty_and_degenerate():
    assert iou_matrix(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)
    assert iou_matrix([], [[0, 0, 1, 1]]).shape == (0, 1)
    m = iou_matrix([[5, 5, 5, 5], [3, 3, 1, 1]], [[5, 5, 5, 5], [0, 0, 10, 10]])
    assert np.isfinite(m).all() and (m == 0).all()


def test_iou_matrix_touching_boxes_do_not_overlap():
    assert iou_matrix([[0, 0, 10, 10]], [[10, 0, 20, 10]])[0, 0] == 0.0


# --- match ----------------------------------------------------------------------------------------------


def test_match_greedy_by_confidence():
    truths = [det(0, 0, 10, 10), det(20, 0, 30, 10)]
    # The confident prediction overlaps truth 0 only slightly less than the weak one; it wins truth 0.
    preds = [det(0, 0, 10, 9, conf=0.3), det(0, 0, 10, 8, conf=0.9), det(20, 0, 30, 10, conf=0.5)]
    r = match(preds, truths)
    assert r.pairs == [(1, 0), (2, 1)]
    assert r.unmatched_preds == [0]
    assert r.unmatched_truths == []


def test_match_takes_the_best_free_truth():
    truths = [det(0, 0, 10, 10), det(1, 0, 11, 10)]
    preds = [det(1, 0, 11, 10, conf=0.9), det(0, 0, 10, 10, conf=0.8)]
    assert match(preds, truths).pairs == [(0, 1), (1, 0)]


def test_match_class_and_iou_threshold():
    truths = [det(0, 0, 10, 10, cls=1)]
    preds = [det(0, 0, 10, 10, cls=2)]
    assert match(preds, truths).pairs == []
    assert match(preds, truths, same_class=False).pairs == [(0, 0)]
    shifted = [det(5, 0, 15, 10, cls=1)]  # IoU 1/3
    assert match(shifted, truths).pairs == []
    assert match(shifted, truths, iou=0.3).pairs == [(0, 0)]
    exact = [det(0, 0, 10, 5, cls=1)]  # IoU exactly 0.5 counts
    assert match(exact, truths, iou=0.5).pairs == [(0, 0)]


def test_match_empty_lists():
    assert match([], []) == ([], [], [])
    assert match([det(0, 0, 1, 1)], []) == ([], [0], [])
    assert match([], [det(0, 0, 1, 1), det(2, 2, 3, 3)]) == ([], [], [0, 1])
    with pytest.raises(ValueError):
        match([], [], iou=0.0)


def test_a_duplicate_prediction_is_a_false_positive():
    r = match([det(0, 0, 10, 10, conf=0.9), det(0, 0, 10, 10, conf=0.8)], [det(0, 0, 10, 10)])
    assert r.pairs == [(0, 0)] and r.unmatched_preds == [1]


# --- frame_is_correct / frame_accuracy ------------------------------------------------------------------


def test_frame_is_correct():
    truths = [det(0, 0, 10, 10, cls=0), det(20, 20, 40, 40, cls=1)]
    good = [det(1, 0, 10, 10, cls=0), det(20, 21, 40, 40, cls=1)]
    assert frame_is_correct(good, truths)
    assert not frame_is_correct(good[:1], truths)  # a miss
    assert not frame_is_correct([*good, det(60, 60, 70, 70)], truths)  # a false positive
    assert not frame_is_correct([good[0], det(20, 21, 40, 40, cls=0)], truths)  # wrong class
    assert frame_is_correct([*good, det(60, 60, 70, 70, conf=0.1)], truths, min_conf=0.25)
    assert frame_is_correct([], [])
    assert not frame_is_correct([det(0, 0, 1, 1)], [])


def test_frame_accuracy():
    t = [[det(0, 0, 10, 10)], [], [det(0, 0, 10, 10)]]
    p = [[det(0, 0, 10, 10)], [], []]
    assert frame_accuracy(p, t) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        frame_accuracy([], [])
    with pytest.raises(ValueError):
        frame_accuracy(p[:2], t)


# --- agreement ------------------------------------------------------------------------------------------


def test_agreement_identical_and_empty():
    boxes = [det(0, 0, 10, 10, cls=0), det(20, 20, 30, 30, cls=1)]
    assert agreement(boxes, boxes) == 1.0
    assert agreement([], []) == 1.0
    assert agreement_counts([], []) == (0, 0)
    assert agreement(boxes, []) == 0.0
    assert agreement([], boxes) == 0.0


def test_agreement_counts_boxes_on_both_sides():
    active = [det(0, 0, 10, 10), det(20, 20, 30, 30), det(50, 50, 60, 60)]
    candidate = [det(0, 0, 10, 10), det(20, 20, 30, 30, cls=1)]  # one agrees, one wrong class
    assert agreement_counts(active, candidate) == (2, 5)
    assert agreement(active, candidate) == pytest.approx(2 / 5)


def test_agreement_is_symmetric():
    rng = np.random.default_rng(0)
    for _ in range(50):

        def rand_list(n):
            xy = rng.uniform(0, 40, size=(n, 2))
            wh = rng.uniform(5, 30, size=(n, 2))
            return [
                det(x, y, x + w, y + h, cls=int(rng.integers(0, 2)), conf=float(rng.uniform(0, 1)))
                for (x, y), (w, h) in zip(xy, wh, strict=True)
            ]

        a, b = rand_list(int(rng.integers(0, 8))), rand_list(int(rng.integers(0, 8)))
        assert agreement(a, b) == agreement(b, a)
        assert agreement_counts(a, b) == agreement_counts(b, a)
        assert 0.0 <= agreement(a, b) <= 1.0


def test_agreement_ignores_weak_boxes_but_lets_them_confirm():
    active = [det(0, 0, 10, 10, conf=0.9), det(50, 50, 60, 60, conf=0.1)]
    candidate = [det(0, 0, 10, 10, conf=0.24)]  # just under min_conf, same object
    # The weak candidate box confirms the confident active one; the weak active box is not counted.
    assert agreement_counts(active, candidate, min_conf=0.25) == (1, 1)
    assert agreement(active, candidate, min_conf=0.25) == 1.0
    # Two weak boxes alone: nothing confident, full agreement.
    assert agreement([det(0, 0, 10, 10, conf=0.1)], [det(80, 80, 90, 90, conf=0.1)], min_conf=0.25) == 1.0
    # With min_conf=0 every box counts.
    assert agreement(active, candidate, min_conf=0.0) == pytest.approx(2 / 3)


def test_agreement_one_to_one():
    active = [det(0, 0, 10, 10)]
    candidate = [det(0, 0, 10, 10), det(0, 0, 10, 10.5)]  # a duplicate does not double-count
    assert agreement_counts(active, candidate) == (2, 3)


def test_agreement_prefers_pairs_of_confident_boxes():
    # Active's confident box overlaps a weak and a confident candidate box; pairing it with the
    # confident one lets both count (the weak one is never counted either way).
    active = [det(0, 0, 10, 10, conf=0.9)]
    candidate = [det(0, 0, 10, 10, conf=0.1), det(0, 0, 10, 9, conf=0.8)]
    assert agreement_counts(active, candidate) == (2, 2)


def test_confident_agreement_counts_only_the_active_models_confident_boxes():
    active = [det(0, 0, 10, 10, conf=0.9), det(20, 20, 30, 30, conf=0.8), det(40, 40, 50, 50, conf=0.1)]
    # The candidate finds the first (weakly), misses the second, and adds boxes of its own.
    candidate = [det(0, 0, 10, 10, conf=0.3), det(60, 60, 70, 70, conf=0.95), det(40, 40, 50, 50, conf=0.9)]
    assert confident_agreement_counts(active, candidate) == (1, 2)
    # New detections where the active model saw nothing confident are not disagreements here.
    assert confident_agreement_counts([det(0, 0, 10, 10, conf=0.1)], candidate) == (0, 0)
    # A class change is.
    assert confident_agreement_counts([det(0, 0, 10, 10, cls=1)], [det(0, 0, 10, 10, cls=2)]) == (0, 1)
