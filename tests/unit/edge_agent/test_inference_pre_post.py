"""Letterbox and decode/NMS: geometry against Ultralytics itself, NMS on hand-made head outputs."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.inference.postprocess import decode, nms, postprocess
from edge_agent.inference.preprocess import letterbox, letterbox_params, preprocess, to_bgr
from edge_agent.inference.types import Detection, InferenceResult, detections_to_arrays
from edgeloop.paths import cache_dir  # noqa: E402
from training.ultralytics_env import offline_ultralytics  # noqa: E402

# The one offline set-up every test process shares (the same as the session fixture's).
offline_ultralytics(cache_dir() / "ultralytics")
torch = pytest.importorskip("torch")
ul_augment = pytest.importorskip("ultralytics.data.augment")
from ultralytics.utils import nms as ul_nms  # noqa: E402
from ultralytics.utils import ops as ul_ops  # noqa: E402

ODD_SHAPES = [
    (1, 1),
    (7, 13),
    (13, 7),
    (159, 161),
    (161, 159),
    (479, 641),
    (1080, 1920),
    (33, 1000),
    (3000, 1),
    (160, 160),
    (81, 80),
]
TARGETS = [160, (160, 160), 640, (256, 320), (320, 256)]


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --- letterbox ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scaleup", [True, False])
def test_letterbox_is_pixel_identical_to_ultralytics(shape, target, scaleup):
    img = _random_image(*shape)
    ours, lb = letterbox(img, target, scaleup=scaleup)
    theirs = ul_augment.LetterBox(target, auto=False, scaleup=scaleup, center=True)(image=img.copy())
    assert ours.shape == theirs.shape
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs)
    th, tw = (target, target) if isinstance(target, int) else target
    assert lb.input_shape == (th, tw) == ours.shape[:2]
    # The resized image sits at `pad`; the rest is the 114 border.
    left, top = lb.pad
    rh, rw = lb.resized_shape
    mask = np.ones(ours.shape[:2], dtype=bool)
    mask[top : top + rh, left : left + rw] = False
    assert (ours[mask] == 114).all()


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("target", [160, (256, 320), (320, 256)])
def test_boxes_map_back_exactly_like_ultralytics_scale_boxes(shape, target):
    lb = letterbox_params(shape, target)
    th, tw = lb.input_shape
    rng = np.random.default_rng(1)
    xy = rng.uniform(-10, [tw + 10, th + 10], size=(50, 2))
    wh = rng.uniform(0, [tw / 2, th / 2], size=(50, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    theirs = ul_ops.scale_boxes((th, tw), torch.from_numpy(boxes.copy()), shape).numpy()
    ours = lb.to_original(boxes)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    h, w = shape
    assert ours[:, [0, 2]].min() >= 0 and ours[:, [0, 2]].max() <= w
    assert ours[:, [1, 3]].min() >= 0 and ours[:, [1, 3]].max() <= h


def test_letterbox_round_trip_of_a_box():
    lb = letterbox_params((300, 500), 160)  # wide frame: padded top and bottom
    assert lb.pad[0] == 0 and lb.pad[1] > 0
    gx, gy = lb.gain
    x1, y1, x2, y2 = 100.0, 50.0, 400.0, 250.0
    boxed = np.array([[x1 * gx + lb.pad[0], y1 * gy + lb.pad[1], x2 * gx + lb.pad[0], y2 * gy + lb.pad[1]]])
    np.testing.assert_allclose(lb.to_original(boxed)[0], [x1, y1, x2, y2], atol=1e-3)


def test_letterbox_rejects_empty_frames():
    with pytest.raises(ValueError, match="empty"):
        letterbox_params((0, 10), 160)


# --- tensor -----------------------------------------------------------------------------------------


def test_preprocess_tensor_layout_matches_ultralytics_predictor_math():
    img = _random_image(123, 77, seed=3)
    tensor, lb = preprocess(img, (160, 128))
    assert tensor.shape == (1, 3, 160, 128)
    assert tensor.dtype == np.float32 and tensor.flags["C_CONTIGUOUS"]
    boxed = ul_augment.LetterBox((160, 128), auto=False)(image=img.copy())
    # Ultralytics predictor: HWC->CHW, flip channels to RGB, float, / 255.
    expected = torch.from_numpy(boxed).permute(2, 0, 1).flip(0).float().div_(255)[None].numpy()
    np.testing.assert_array_equal(tensor, expected)
    assert lb.orig_shape == (123, 77)


def test_preprocess_channel_order_is_rgb():
    img = np.zeros((10, 10, 3), np.uint8)
    img[..., 0] = 255  # pure blue in BGR
    tensor, _ = preprocess(img, 10)
    assert tensor[0, 2].min() == 1.0 and tensor[0, 0].max() == 0.0


def test_preprocess_float16_and_grayscale_and_bgra():
    gray = np.full((20, 30), 200, np.uint8)
    t16, _ = preprocess(gray, 32, dtype=np.float16)
    assert t16.dtype == np.float16 and t16.shape == (1, 3, 32, 32)
    assert to_bgr(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    assert to_bgr(np.zeros((5, 6, 1), np.uint8)).shape == (5, 6, 3)
    with pytest.raises(ValueError, match="uint8"):
        to_bgr(np.zeros((5, 6, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_bgr(np.zeros((5, 6, 2), np.uint8))


# --- decode + NMS on hand-made outputs ----------------------------------------------------------------


def _head(
    boxes_cls_scores: list[tuple[tuple[float, float, float, float], int, float]], nc: int, anchors: int = 20
):
    """A [1, 4+nc, anchors] output: given (xyxy, class, score) rows first, then background anchors."""
    out = np.zeros((1, 4 + nc, anchors), np.float32)
    out[0, :4] = np.array([[5.0], [5.0], [2.0], [2.0]])  # tiny background boxes with score 0
    for k, ((x1, y1, x2, y2), c, s) in enumerate(boxes_cls_scores):
        out[0, :4, k] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        out[0, 4 + c, k] = s
        if nc > 1:
            out[0, 4 + (c + 1) % nc, k] = s / 4  # a weaker second class that must not be picked
    return out


IDENTITY = letterbox_params((160, 160), 160)


def test_overlapping_same_class_boxes_are_suppressed_keeping_the_best():
    out = _head([((10, 10, 60, 60), 0, 0.6), ((12, 12, 62, 62), 0, 0.9), ((11, 10, 60, 61), 0, 0.5)], nc=2)
    dets = postprocess(out, IDENTITY)
    assert len(dets) == 1
    d = dets[0]
    assert d.cls == 0 and d.conf == pytest.approx(0.9)
    assert d.xyxy == pytest.approx((12, 12, 62, 62))


def test_overlapping_boxes_of_different_classes_are_kept():
    out = _head([((10, 10, 60, 60), 0, 0.9), ((10, 10, 60, 60), 1, 0.8), ((10, 10, 60, 60), 2, 0.7)], nc=3)
    dets = postprocess(out, IDENTITY)
    assert sorted(d.cls for d in dets) == [0, 1, 2]
    assert [d.conf for d in dets] == sorted((d.conf for d in dets), reverse=True)
    # ...unless NMS is class-agnostic.
    assert len(postprocess(out, IDENTITY, agnostic=True)) == 1


def test_iou_threshold_is_strict_like_ultralytics():
    # IoU of these two boxes is exactly 0.5: a 90x90 box and a copy shifted by a third of its width.
    a, b = (0, 0, 90, 90), (30, 0, 120, 90)  # inter 60*90, union 120*90 -> 0.5
    out = _head([(a, 0, 0.9), (b, 0, 0.8)], nc=1)
    assert len(postprocess(out, IDENTITY, iou=0.5)) == 2  # suppressed only when IoU > iou
    assert len(postprocess(out, IDENTITY, iou=0.49)) == 1


def test_conf_filter_is_strictly_greater_and_uses_the_best_class():
    out = _head(
        [((10, 10, 30, 30), 0, 0.25), ((50, 50, 90, 90), 1, 0.2501), ((100, 100, 140, 140), 0, 0.1)], nc=2
    )
    dets = postprocess(out, IDENTITY)  # default conf 0.25
    assert [(d.cls, round(d.conf, 4)) for d in dets] == [(1, 0.2501)]
    assert len(postprocess(out, IDENTITY, conf=0.05)) == 3
    assert postprocess(out, IDENTITY, conf=0.99) == []


def test_max_det_keeps_the_highest_scores():
    rows = [((i * 15.0, 0.0, i * 15.0 + 10, 10.0), 0, 0.3 + i * 0.05) for i in range(10)]
    dets = postprocess(_head(rows, nc=1), IDENTITY, max_det=3)
    assert [round(d.conf, 2) for d in dets] == [0.75, 0.7, 0.65]


def test_coordinates_are_mapped_back_to_the_original_frame_and_clipped():
    lb = letterbox_params((240, 320), 160)  # gain 0.5, 20 px of padding top and bottom
    assert lb.gain == (0.5, 0.5) and lb.pad == (0, 20)
    out = _head([((10, 30, 50, 70), 1, 0.9), ((-5, 10, 20, 150), 0, 0.8)], nc=2)
    dets = postprocess(out, lb)
    by_cls = {d.cls: d for d in dets}
    assert by_cls[1].xyxy == pytest.approx((20, 20, 100, 100))
    assert by_cls[0].xyxy == pytest.approx((0, 0, 40, 240))  # (-10, -20, 40, 260) clipped to 320x240


def test_empty_and_malformed_outputs():
    assert postprocess(np.zeros((1, 6, 30), np.float32), IDENTITY) == []
    boxes, scores, cls = decode(np.zeros((1, 6, 30), np.float32))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and cls.shape == (0,)
    assert nms(boxes, scores, cls).size == 0
    with pytest.raises(ValueError, match="channels"):
        decode(np.zeros((1, 5, 30), np.float32), nc=2)
    with pytest.raises(ValueError, match="batch"):
        decode(np.zeros((2, 6, 30), np.float32))
    with pytest.raises(ValueError, match="conf"):
        postprocess(np.zeros((1, 6, 30), np.float32), IDENTITY, conf=1.5)


def test_extra_channels_after_the_classes_are_ignored():
    out = _head([((10, 10, 60, 60), 1, 0.9)], nc=2)
    with_masks = np.concatenate([out, np.full((1, 32, out.shape[2]), 5.0, np.float32)], axis=1)
    assert postprocess(with_masks, IDENTITY, nc=2) == postprocess(out, IDENTITY)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("orig", [(480, 640), (333, 211)])
@pytest.mark.parametrize("agnostic", [False, True])
def test_postprocess_matches_ultralytics_nms_on_random_outputs(seed, orig, agnostic):
    rng = np.random.default_rng(seed)
    nc, anchors, size = 3, 2100, 320
    out = np.zeros((1, 4 + nc, anchors), np.float32)
    centers = rng.uniform(0, size, size=(12, 2))  # clusters of overlapping boxes
    pick = rng.integers(0, len(centers), anchors)
    out[0, 0:2] = (centers[pick] + rng.normal(0, 6, size=(anchors, 2))).T
    out[0, 2:4] = rng.uniform(8, 90, size=(2, anchors))
    out[0, 4:] = rng.uniform(0, 1, size=(nc, anchors)) ** 3
    lb = letterbox_params(orig, size)
    ours = postprocess(out, lb, conf=0.25, iou=0.7, max_det=300, agnostic=agnostic)
    theirs = ul_nms.non_max_suppression(
        torch.from_numpy(out), conf_thres=0.25, iou_thres=0.7, max_det=300, agnostic=agnostic
    )[0]
    theirs[:, :4] = ul_ops.scale_boxes((size, size), theirs[:, :4], orig)
    theirs = theirs.numpy()
    assert len(ours) == len(theirs) > 10
    boxes, conf, cls = detections_to_arrays(ours)
    np.testing.assert_allclose(boxes, theirs[:, :4], atol=1e-3)
    np.testing.assert_allclose(conf, theirs[:, 4], atol=1e-6)
    np.testing.assert_array_equal(cls, theirs[:, 5].astype(int))


# --- types ----------------------------------------------------------------------------------------------


def test_detection_yolo_round_trip_and_helpers():
    d = Detection(cls=2, conf=0.8, x1=10, y1=20, x2=50, y2=100)
    cx, cy, w, h = d.to_yolo(200, 400)
    assert (cx, cy, w, h) == pytest.approx((0.15, 0.15, 0.2, 0.2))
    back = Detection.from_yolo(2, cx, cy, w, h, 200, 400, conf=0.8)
    assert back.cls == 2 and back.conf == 0.8
    assert back.xyxy == pytest.approx(d.xyxy)
    assert d.area == 40 * 80 and d.width == 40 and d.height == 80
    assert Detection.from_yolo(0, 0.5, 0.5, 1, 1, 10, 10).conf == 1.0
    with pytest.raises(ValueError):
        d.to_yolo(0, 10)
    with pytest.raises(AttributeError):
        d.conf = 0.1  # type: ignore[misc]
    r = InferenceResult(detections=(d,), latency_ms=1.5)
    assert r.detections[0] is d
