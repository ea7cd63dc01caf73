"""Box matching between detection lists (pure numpy).

Used by the shadow runner (does the candidate agree with the active model?) and
by sample collection / accuracy gates (is a prediction right against a corrected
label?). All boxes are xyxy in the same pixel space; a box pair "matches" when
its IoU is >= the threshold (and, by default, the classes are equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from edge_agent.inference.types import Detection, detections_to_arrays

DEFAULT_IOU = 0.5
DEFAULT_AGREEMENT_MIN_CONF = 0.25


class MatchResult(NamedTuple):
    """Indices into the two lists passed to :func:`match`."""

    pairs: list[tuple[int, int]]  # (pred index, truth index)
    unmatched_preds: list[int]  # false positives
    unmatched_truths: list[int]  # misses


def iou_matrix(a_xyxy: np.ndarray | Sequence, b_xyxy: np.ndarray | Sequence) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` xyxy boxes -> ``(N, M)`` float64.

    Degenerate boxes (zero or negative width/height) have IoU 0 with everything, never NaN.
    """
    a = np.asarray(a_xyxy, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b_xyxy, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def _check_iou(iou: float) -> None:
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou threshold must be in (0, 1], got {iou}")


def _eligible(
    a: Sequence[Detection], b: Sequence[Detection], iou: float, same_class: bool
) -> tuple[np.ndarray, np.ndarray]:
    """IoU matrix and the mask of pairs allowed to match."""
    a_boxes, _, a_cls = detections_to_arrays(a)
    b_boxes, _, b_cls = detections_to_arrays(b)
    ious = iou_matrix(a_boxes, b_boxes)
    ok = ious >= iou
    if same_class:
        ok &= a_cls[:, None] == b_cls[None, :]
    return ious, ok


def match(
    preds: Sequence[Detection],
    truths: Sequence[Detection],
    iou: float = DEFAULT_IOU,
    same_class: bool = True,
) -> MatchResult:
    """Greedy matching: predictions by descending confidence each take the still-free truth
    with the highest IoU (>= ``iou``; same class when ``same_class``). Ties keep list order.
    """
    _check_iou(iou)
    ious, ok = _eligible(preds, truths, iou, same_class)
    scores = np.where(ok, ious, -1.0)
    free = np.ones(len(truths), dtype=bool)
    pairs: list[tuple[int, int]] = []
    unmatched_preds: list[int] = []
    order = np.argsort([-p.conf for p in preds], kind="stable")
    for i in order.tolist():
        cand = np.where(free, scores[i], -1.0)
        j = int(cand.argmax()) if len(truths) else -1
        if j >= 0 and cand[j] >= 0:
            pairs.append((i, j))
            free[j] = False
        else:
            unmatched_preds.append(i)
    pairs.sort()
    return MatchResult(pairs, sorted(unmatched_preds), np.flatnonzero(free).tolist())


def frame_is_correct(
    preds: Sequence[Detection],
    truths: Sequence[Detection],
    iou: float = DEFAULT_IOU,
    min_conf: float = 0.0,
) -> bool:
    """True when every truth is matched by a same-class prediction and no prediction is left over.

    Predictions below ``min_conf`` are ignored. An empty frame with no predictions is correct.
    """
    kept = [p for p in preds if p.conf >= min_conf]
    result = match(kept, truths, iou=iou, same_class=True)
    return not result.unmatched_preds and not result.unmatched_truths


def frame_accuracy(
    preds_per_frame: Sequence[Sequence[Detection]],
    truths_per_frame: Sequence[Sequence[Detection]],
    iou: float = DEFAULT_IOU,
    min_conf: float = 0.0,
) -> float:
    """Share of frames for which :func:`frame_is_correct` holds.

    Raises ``ValueError`` when the lists differ in length or are empty: "no labelled
    frames" must be handled by the caller, not read as 0 % or 100 %.
    """
    if len(preds_per_frame) != len(truths_per_frame):
        raise ValueError(f"{len(preds_per_frame)} prediction lists for {len(truths_per_frame)} truth lists")
    if not preds_per_frame:
        raise ValueError("frame_accuracy needs at least one frame")
    correct = sum(
        frame_is_correct(p, t, iou=iou, min_conf=min_conf)
        for p, t in zip(preds_per_frame, truths_per_frame, strict=True)
    )
    return correct / len(preds_per_frame)


def _agreed_boxes(ious: np.ndarray, ok: np.ndarray, strong_a: np.ndarray, strong_b: np.ndarray) -> int:
    """Greedy one-to-one pairing (pairs of two confident boxes first, then by IoU); confident boxes paired."""
    ii, jj = np.nonzero(ok)
    if ii.size == 0:
        return 0
    weight = strong_a[ii].astype(np.int64) + strong_b[jj].astype(np.int64)
    order = np.lexsort((jj, ii, -ious[ii, jj], -weight))
    used_a = np.zeros(ok.shape[0], dtype=bool)
    used_b = np.zeros(ok.shape[1], dtype=bool)
    agreed = 0
    for k in order.tolist():
        i, j = ii[k], jj[k]
        if not used_a[i] and not used_b[j]:
            used_a[i] = used_b[j] = True
            agreed += int(weight[k])
    return agreed


def agreement_counts(
    active: Sequence[Detection],
    candidate: Sequence[Detection],
    iou: float = DEFAULT_IOU,
    min_conf: float = DEFAULT_AGREEMENT_MIN_CONF,
) -> tuple[int, int]:
    """``(agreed, total)`` confident boxes for one frame; see :func:`agreement`.

    Summing both over a window and dividing gives the window's agreement weighted by
    boxes (rather than averaging per-frame ratios, which over-weights sparse frames).
    """
    _check_iou(iou)
    strong_a = np.array([d.conf >= min_conf for d in active], dtype=bool)
    strong_c = np.array([d.conf >= min_conf for d in candidate], dtype=bool)
    total = int(strong_a.sum() + strong_c.sum())
    if total == 0:
        return 0, 0
    ious, ok = _eligible(active, candidate, iou, same_class=True)
    ok &= strong_a[:, None] | strong_c[None, :]  # two weak boxes never count
    # Greedy tie-breaking depends on argument order; taking the better of both orders makes it symmetric.
    agreed = max(
        _agreed_boxes(ious, ok, strong_a, strong_c),
        _agreed_boxes(ious.T, ok.T, strong_c, strong_a),
    )
    return agreed, total


def confident_agreement_counts(
    active: Sequence[Detection],
    candidate: Sequence[Detection],
    iou: float = DEFAULT_IOU,
    min_conf: float = DEFAULT_AGREEMENT_MIN_CONF,
) -> tuple[int, int]:
    """``(found, confident)``: the active model's confident boxes, and how many of them the candidate
    also found (same class, IoU >= ``iou``, any confidence; one-to-one). Boxes only the candidate
    reports do not count: where the active model is not confident, corrected labels judge."""
    _check_iou(iou)
    strong = [d for d in active if d.conf >= min_conf]
    if not strong:
        return 0, 0
    result = match(list(candidate), strong, iou=iou, same_class=True)
    return len(result.pairs), len(strong)


def agreement(
    active: Sequence[Detection],
    candidate: Sequence[Detection],
    iou: float = DEFAULT_IOU,
    min_conf: float = DEFAULT_AGREEMENT_MIN_CONF,
) -> float:
    """Share of confident boxes, over both models, that the other model also found.

    A box is *confident* when its conf >= ``min_conf``; only confident boxes are
    counted. Boxes are paired one-to-one (same class, IoU >= ``iou``); a confident
    box may pair with a weaker box of the other model, so a score that dips just
    under ``min_conf`` in one model is not a disagreement. Result =
    ``paired confident boxes / all confident boxes`` in [0, 1] (2 x matches /
    (n_active + n_candidate) when every box is confident, i.e. an F1 between the
    two lists). Symmetric in its arguments; two lists with no confident box agree (1.0).
    """
    agreed, total = agreement_counts(active, candidate, iou=iou, min_conf=min_conf)
    return 1.0 if total == 0 else agreed / total
