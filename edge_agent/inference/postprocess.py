"""Decode raw YOLOv8 detect-head output into :class:`Detection` objects.

The exported head (``nms=False``) outputs ``[1, 4 + nc, anchors]``: per anchor a
``cx, cy, w, h`` box in model-input pixels followed by ``nc`` class scores that
are already sigmoid-activated. Decoding mirrors Ultralytics'
``non_max_suppression`` (best class per anchor, strict ``> conf``, class-aware
NMS, suppression when IoU ``> iou``, ``max_det`` highest scores) with OpenCV's
``cv2.dnn.NMSBoxesBatched`` doing the suppression.
"""

from __future__ import annotations

import cv2
import numpy as np

from edge_agent.inference.preprocess import Letterbox
from edge_agent.inference.types import Detection

DEFAULT_CONF = 0.25
DEFAULT_IOU = 0.7
DEFAULT_MAX_DET = 300
MAX_NMS = 30000  # as Ultralytics: at most this many candidates (highest scores) enter NMS


def _check_thresholds(conf: float, iou: float, max_det: int) -> None:
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be in [0, 1], got {conf}")
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"iou must be in [0, 1], got {iou}")
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")


def decode(
    output: np.ndarray, conf: float = DEFAULT_CONF, nc: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates above ``conf`` from a ``[1, 4+nc(+extra), anchors]`` (or ``[4+nc, anchors]``) output.

    Returns ``(boxes_xyxy float32 (N, 4), scores float32 (N,), class_ids int32 (N,))`` in
    model-input pixels, unsorted. Channels after ``4 + nc`` (mask coefficients, ...) are ignored.
    """
    pred = np.asarray(output)
    if pred.ndim == 3:
        if pred.shape[0] != 1:
            raise ValueError(f"expected batch size 1, got output shape {pred.shape}")
        pred = pred[0]
    if pred.ndim != 2:
        raise ValueError(f"expected output [1, 4+nc, anchors], got shape {np.shape(output)}")
    nc = pred.shape[0] - 4 if nc is None else nc
    if nc < 1 or pred.shape[0] < 4 + nc:
        raise ValueError(f"output has {pred.shape[0]} channels, need 4 + nc = {4 + nc}")
    pred = pred.astype(np.float32, copy=False)
    scores_all = pred[4 : 4 + nc]  # (nc, A)
    class_ids = scores_all.argmax(axis=0)
    scores = np.take_along_axis(scores_all, class_ids[None], axis=0)[0]
    keep = scores > conf
    if not keep.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32)
    xywh = pred[:4, keep].T
    boxes = np.empty_like(xywh)
    half_w, half_h = xywh[:, 2] / 2, xywh[:, 3] / 2
    boxes[:, 0] = xywh[:, 0] - half_w
    boxes[:, 1] = xywh[:, 1] - half_h
    boxes[:, 2] = xywh[:, 0] + half_w
    boxes[:, 3] = xywh[:, 1] + half_h
    return boxes, scores[keep], class_ids[keep].astype(np.int32)


def nms(
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    iou: float = DEFAULT_IOU,
    max_det: int = DEFAULT_MAX_DET,
    agnostic: bool = False,
) -> np.ndarray:
    """Class-aware NMS (``cv2.dnn.NMSBoxesBatched``); indices of kept boxes, highest score first."""
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = None
    if n > MAX_NMS:
        order = np.argsort(-scores, kind="stable")[:MAX_NMS]
        boxes_xyxy, scores, class_ids = boxes_xyxy[order], scores[order], class_ids[order]
    # OpenCV takes (x, y, w, h); float64 input selects its Rect2d overload (no integer truncation).
    b = np.asarray(boxes_xyxy, dtype=np.float64)
    xywh = np.column_stack((b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]))
    ids = np.zeros(len(scores), np.int32) if agnostic else np.asarray(class_ids, dtype=np.int32)
    # No top_k: OpenCV applies it to the candidates *before* suppression, which would return fewer
    # than max_det boxes. Its result is ordered by descending score, so max_det is a slice.
    keep = cv2.dnn.NMSBoxesBatched(xywh, np.asarray(scores, dtype=np.float32), ids, 0.0, float(iou))
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)[:max_det]
    return order[keep] if order is not None else keep


def postprocess(
    output: np.ndarray,
    lb: Letterbox,
    conf: float = DEFAULT_CONF,
    iou: float = DEFAULT_IOU,
    max_det: int = DEFAULT_MAX_DET,
    nc: int | None = None,
    agnostic: bool = False,
) -> list[Detection]:
    """Raw head output -> detections in original-frame pixels, clipped, highest confidence first."""
    _check_thresholds(conf, iou, max_det)
    boxes, scores, class_ids = decode(output, conf=conf, nc=nc)
    keep = nms(boxes, scores, class_ids, iou=iou, max_det=max_det, agnostic=agnostic)
    if keep.size == 0:
        return []
    mapped = lb.to_original(boxes[keep], clip=True)
    return [
        Detection(int(c), float(s), float(x1), float(y1), float(x2), float(y2))
        for (x1, y1, x2, y2), s, c in zip(
            mapped.tolist(), scores[keep].tolist(), class_ids[keep].tolist(), strict=True
        )
    ]
