"""Ingest-time sample checks: labels, object key, and the uploaded image bytes."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

from protocol.messages import Box, SampleEvent, SampleReason
from server.sample_validation import ImageLimits, SampleRejected, check_image, check_labels, check_object_key

CLASSES = ["scratch", "dent", "stain"]
LIMITS = ImageLimits(max_bytes=1_000_000, max_side=1024)


def _encode(width: int, height: int, ext: str = ".jpg") -> bytes:
    image = np.random.default_rng(width * 7 + height).integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def _event(data: bytes = b"x", **overrides) -> SampleEvent:
    fields = dict(device_id="dev-1", sample_id="00112233aabbccdd", object_key="images/dev-1/00112233aabbccdd.jpg",
                  sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), width=64, height=48,
                  reason=SampleReason.CORRECTION)
    fields.update(overrides)
    return SampleEvent(**fields)


def _box(**kw) -> Box:
    return Box(**{"cls": 0, "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2, **kw})


# --- labels -------------------------------------------------------------------------------------------


def test_valid_labels_pass() -> None:
    check_labels(None, CLASSES)
    check_labels([], CLASSES)
    check_labels([_box(cls=2), _box(cx=0.1, cy=0.9, w=0.2, h=0.2), _box(cx=0.5, cy=0.5, w=1.0, h=1.0)], CLASSES)


def test_class_id_outside_the_list_names_id_and_list() -> None:
    with pytest.raises(SampleRejected) as info:
        check_labels([_box(), _box(cls=3)], CLASSES)
    msg = str(info.value)
    assert "label 1" in msg
    assert "class id 3" in msg
    assert "3 classes" in msg and "scratch, dent, stain" in msg


@pytest.mark.parametrize(("w", "h"), [(0.0, 0.2), (0.2, 0.0), (-0.1, 0.2), (0.2, -0.5)])
def test_zero_or_negative_area_is_rejected(w: float, h: float) -> None:
    with pytest.raises(SampleRejected, match="no area"):
        check_labels([_box(w=w, h=h)], CLASSES)


@pytest.mark.parametrize(
    "box",
    [dict(cx=0.95, w=0.2), dict(cx=0.05, w=0.2), dict(cy=1.2, h=0.1), dict(cy=-0.2, h=0.1), dict(w=1.5)],
)
def test_box_outside_the_image_is_rejected(box: dict) -> None:
    with pytest.raises(SampleRejected, match="outside the image"):
        check_labels([_box(**box)], CLASSES)


def test_tiny_rounding_overshoot_is_tolerated() -> None:
    check_labels([_box(cx=0.9, w=0.2005)], CLASSES)  # x2 = 1.00025


@pytest.mark.parametrize("field", ["cx", "cy", "w", "h"])
def test_non_finite_coordinates_are_rejected(field: str) -> None:
    with pytest.raises(SampleRejected, match="non-finite"):
        check_labels([_box(**{field: float("nan")})], CLASSES)


def test_nan_label_from_the_wire_is_rejected() -> None:
    box = Box.model_validate_json('{"cls": 0, "cx": NaN, "cy": 0.5, "w": 0.1, "h": 0.1}')
    with pytest.raises(SampleRejected):
        check_labels([box], CLASSES)


# --- object key ---------------------------------------------------------------------------------------


def test_object_key_under_own_prefix_passes() -> None:
    check_object_key(_event())


@pytest.mark.parametrize(
    "key",
    ["images/dev-2/a.jpg", "images/dev-1", "images/dev-10/a.jpg", "dev-1/a.jpg", "snapshots/x.json",
     "images/dev-1/../dev-2/a.jpg", "images/dev-1/..", "/images/dev-1/a.jpg"],
)
def test_object_key_outside_prefix_is_rejected(key: str) -> None:
    with pytest.raises(SampleRejected, match="images/dev-1/"):
        check_object_key(_event(object_key=key))


# --- image --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_valid_image_is_decoded(ext: str) -> None:
    data = _encode(64, 48, ext)
    image = check_image(data, _event(data), LIMITS)
    assert image.shape == (48, 64, 3)


def test_over_byte_limit_is_rejected() -> None:
    data = _encode(64, 48, ".png")
    with pytest.raises(SampleRejected, match="limit"):
        check_image(data, _event(data), ImageLimits(max_bytes=len(data) - 1, max_side=1024))


def test_size_mismatch_is_rejected() -> None:
    data = _encode(64, 48)
    with pytest.raises(SampleRejected, match=f"{len(data)} bytes but the event declares {len(data) + 1}"):
        check_image(data, _event(data, size_bytes=len(data) + 1), LIMITS)


def test_sha_mismatch_is_rejected() -> None:
    data = _encode(64, 48)
    with pytest.raises(SampleRejected, match="sha256"):
        check_image(data, _event(data, sha256="0" * 64), LIMITS)


def test_same_size_but_tampered_bytes_fail_the_hash() -> None:
    data = _encode(64, 48)
    event = _event(data)
    tampered = data[:-10] + bytes(10)
    with pytest.raises(SampleRejected, match="sha256"):
        check_image(tampered, event, LIMITS)


def test_undecodable_bytes_are_rejected() -> None:
    data = b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20
    with pytest.raises(SampleRejected, match="does not decode"):
        check_image(data, _event(data), LIMITS)


@pytest.mark.parametrize(("w", "h"), [(48, 64), (64, 47), (1, 1)])
def test_dimension_mismatch_is_rejected(w: int, h: int) -> None:
    data = _encode(64, 48)
    with pytest.raises(SampleRejected, match=f"64x48 but the event declares {w}x{h}"):
        check_image(data, _event(data, width=w, height=h), LIMITS)


def test_over_max_side_is_rejected() -> None:
    data = _encode(300, 20, ".png")
    with pytest.raises(SampleRejected, match="300x20, over the 256-pixel side limit"):
        check_image(data, _event(data, width=300, height=20), ImageLimits(max_bytes=10**7, max_side=256))
    # exactly at the limit is fine
    check_image(data, _event(data, width=300, height=20), ImageLimits(max_bytes=10**7, max_side=300))
