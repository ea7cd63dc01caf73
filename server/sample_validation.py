"""Ingest-time checks on one collected sample: pure rules, no I/O.

Each check returns a human reason when the sample must be rejected, so that a
rejected sample is stored with why, and the rest of the batch goes on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from protocol.messages import Box, SampleEvent
from training.image_header import DEFAULT_MAX_PIXELS, ImageHeaderError
from training.image_header import image_header_size as _header_size


class SampleRejected(ValueError):
    """The sample is kept in the database as rejected, with this reason."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_side: int
    max_pixels: int = DEFAULT_MAX_PIXELS


def image_header_size(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` from the header, decoding nothing (``training.image_header``, the
    one parser ingest and the data contract share); a bad header is a :class:`SampleRejected`."""
    try:
        return _header_size(data)
    except ImageHeaderError as exc:
        raise SampleRejected(str(exc)) from None


def check_image_header(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """``(width, height)`` from the header, rejected when over the side or pixel limits: run before
    decoding, so that a small file declaring a huge image never allocates its pixels."""
    _, width, height = image_header_size(data)
    if max(height, width) > limits.max_side:
        raise SampleRejected(f"image is {width}x{height}, over the {limits.max_side}-pixel side limit")
    if width * height > limits.max_pixels:
        raise SampleRejected(
            f"image is {width}x{height} ({width * height} pixels), over the {limits.max_pixels}-pixel limit"
        )
    return width, height


def check_object_key(event: SampleEvent) -> None:
    # A device may only point at objects under its own prefix: its presigned grants put them there.
    prefix = f"images/{event.device_id}/"
    if not event.object_key.startswith(prefix) or ".." in event.object_key:
        raise SampleRejected(f"object key {event.object_key!r} is outside the device's prefix {prefix!r}")


def check_labels(labels: Sequence[Box] | None, class_names: Sequence[str]) -> None:
    if labels is None:
        return
    for i, box in enumerate(labels):
        if box.cls >= len(class_names):
            raise SampleRejected(
                f"label {i}: class id {box.cls} is outside the class list "
                f"({len(class_names)} classes: {', '.join(class_names)})"
            )
        if not all(math.isfinite(v) for v in (box.cx, box.cy, box.w, box.h)):
            # NaN compares false against every bound below, so it would slip through them.
            raise SampleRejected(
                f"label {i}: box has a non-finite coordinate (cx={box.cx}, cy={box.cy}, w={box.w}, h={box.h})"
            )
        x1, y1, x2, y2 = box.xyxy()
        if box.w <= 0 or box.h <= 0:
            raise SampleRejected(f"label {i}: box has no area (w={box.w:.4f}, h={box.h:.4f})")
        eps = 1e-3
        if x1 < -eps or y1 < -eps or x2 > 1 + eps or y2 > 1 + eps:
            raise SampleRejected(
                f"label {i}: box ({x1:.3f}, {y1:.3f}, {x2:.3f}, {y2:.3f}) lies outside the image"
            )


def check_image(data: bytes, event: SampleEvent, limits: ImageLimits) -> np.ndarray:
    """Hash, size, header and decode checks on the uploaded bytes; returns the decoded image.

    The dimensions are read from the header and checked before anything is decoded."""
    if len(data) > limits.max_bytes:
        raise SampleRejected(f"object is {len(data)} bytes, over the {limits.max_bytes}-byte limit")
    if len(data) != event.size_bytes:
        raise SampleRejected(f"object is {len(data)} bytes but the event declares {event.size_bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != event.sha256:
        raise SampleRejected(f"object sha256 {digest[:12]}… does not match the event's {event.sha256[:12]}…")
    width, height = check_image_header(data, limits)
    if (width, height) != (event.width, event.height):
        raise SampleRejected(
            f"image is {width}x{height} but the event declares {event.width}x{event.height}"
        )
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise SampleRejected("image does not decode (not a valid JPEG/PNG)")
    if image.shape[1::-1] != (width, height):  # the decoder must agree with the header checked above
        raise SampleRejected(f"image decodes to {image.shape[1]}x{image.shape[0]} but its header says {width}x{height}")
    return image
