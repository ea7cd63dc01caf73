"""Ingest-time checks on one collected sample: pure rules, no I/O.

Each check returns a human reason when the sample must be rejected, so that a
rejected sample is stored with why, and the rest of the batch goes on.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from protocol.messages import Box, SampleEvent


class SampleRejected(ValueError):
    """The sample is kept in the database as rejected, with this reason."""


DEFAULT_MAX_PIXELS = 4096 * 4096  # ~50 MB once decoded to 8-bit BGR

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic):
# every 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_side: int
    max_pixels: int = DEFAULT_MAX_PIXELS


def image_header_size(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` read from a PNG's IHDR or a JPEG's frame header, decoding nothing.

    Only the formats ingest accepts are recognised; anything else is rejected, as is a header that
    is cut short or declares no size.
    """
    if data.startswith(PNG_SIGNATURE):
        # The IHDR chunk must come first: length 13, type, width, height (big-endian uint32).
        if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
            raise SampleRejected("image does not decode (PNG without an IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        fmt = "PNG"
    elif data.startswith(b"\xff\xd8"):
        width, height = _jpeg_frame_size(data)
        fmt = "JPEG"
    else:
        raise SampleRejected("image does not decode (not a JPEG or PNG)")
    if width == 0 or height == 0 or width > 2**31 - 1 or height > 2**31 - 1:
        raise SampleRejected(f"image does not decode ({fmt} header declares {width}x{height})")
    return fmt, width, height


def _jpeg_frame_size(data: bytes) -> tuple[int, int]:
    pos, end = 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            break  # not at a marker: corrupt
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA) or pos + 2 > end:  # EOI / start of scan before any frame header
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            break
        if marker in _JPEG_SOF:
            if length < 7 or pos + 7 > end:
                break
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            return width, height
        pos += length
    raise SampleRejected("image does not decode (JPEG without a frame header)")


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
