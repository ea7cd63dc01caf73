"""Image dimensions come from the header and are checked before decoding (issue 10, bad input):
a few-KB PNG that declares 20000x20000 pixels is rejected without allocating its 1.2 GB."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest

from protocol.messages import SampleEvent, SampleReason
from server.sample_validation import (
    DEFAULT_MAX_PIXELS,
    ImageLimits,
    SampleRejected,
    check_image,
    check_image_header,
    image_header_size,
)
from server.settings import ServerSettings

LIMITS = ImageLimits(max_bytes=8 << 20, max_side=4096)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(width: int, height: int) -> bytes:
    """A genuinely valid 8-bit grayscale PNG of width x height black pixels: rows of zeros compress ~1000:1."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte 0 + the row's pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _png_bomb(20_000, 20_000)


def _event(data: bytes, width: int, height: int) -> SampleEvent:
    return SampleEvent(device_id="dev-1", sample_id="00112233aabbccdd", object_key="images/dev-1/00112233aabbccdd.png",
                       sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), width=width, height=height,
                       reason=SampleReason.CORRECTION)


def test_the_crafted_bomb_is_a_small_valid_png(bomb: bytes) -> None:
    assert len(bomb) < 1 << 20  # ~400 KB for 400 Mpx
    assert image_header_size(bomb) == ("PNG", 20_000, 20_000)
    # It really is a PNG, not only a header: a small one built the same way decodes.
    small = _png_bomb(40, 30)
    assert cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_UNCHANGED).shape == (30, 40)


def test_png_bomb_is_rejected_from_its_header_with_low_memory(bomb: bytes) -> None:
    event = _event(bomb, 640, 480)  # a device may lie about the size in its event
    tracemalloc.start()
    try:
        with pytest.raises(SampleRejected, match="20000x20000, over the 4096-pixel side limit"):
            check_image(bomb, event, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"validation peaked at {peak} bytes"


def test_pixel_count_limit_is_checked_from_the_header(bomb: bytes) -> None:
    wide = _png_bomb(4000, 4000)  # within the side limit, over a 12 Mpx pixel limit
    tracemalloc.start()
    limits = ImageLimits(max_bytes=8 << 20, max_side=4096, max_pixels=12_000_000)
    with pytest.raises(SampleRejected, match=r"4000x4000 \(16000000 pixels\), over the 12000000-pixel limit"):
        check_image(wide, _event(wide, 4000, 4000), limits)
    with pytest.raises(SampleRejected, match="400000000 pixels"):
        check_image_header(bomb, ImageLimits(max_bytes=8 << 20, max_side=10**6, max_pixels=10**8))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 << 20, f"validation peaked at {peak} bytes"


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_normal_images_still_pass(ext: str) -> None:
    image = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, image)
    assert ok
    data = buf.tobytes()
    assert image_header_size(data)[1:] == (640, 480)
    assert check_image(data, _event(data, 640, 480), LIMITS).shape == (480, 640, 3)


def test_progressive_jpeg_and_exif_thumbnail_read_the_main_frame() -> None:
    image = np.zeros((300, 500, 3), np.uint8)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    data = buf.tobytes()
    # An APP1 segment carrying a thumbnail's own frame header must be skipped by its length.
    _, thumb = cv2.imencode(".jpg", np.zeros((8, 16, 3), np.uint8))
    app1 = b"Exif\x00\x00" + thumb.tobytes()
    data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    assert image_header_size(data) == ("JPEG", 500, 300)


def test_jpeg_header_declaring_a_huge_frame_is_rejected_before_decoding() -> None:
    _, buf = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    data = bytearray(buf.tobytes())
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5:sof + 9] = struct.pack(">HH", 60_000, 60_000)
    with pytest.raises(SampleRejected, match="60000x60000, over the 4096-pixel side limit"):
        check_image_header(bytes(data), LIMITS)


@pytest.mark.parametrize(("data", "reason"), [
    (b"GIF89a" + bytes(40), "not a JPEG or PNG"),
    (b"BM" + bytes(60), "not a JPEG or PNG"),
    (b"\x89PNG\r\n\x1a\n" + bytes(10), "PNG without an IHDR"),
    (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 0, 0, 0, 0)), "declares 0x10"),
    (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 2**32 - 1, 1, 8, 0, 0, 0, 0)),
     "declares 4294967295x1"),
    (b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20, "JPEG without a frame header"),
    (b"\xff\xd8\xff\xda\x00\x08" + bytes(20), "JPEG without a frame header"),
    (b"\xff\xd8", "JPEG without a frame header"),
    (b"\xff\xd8\xff\xc0\x00\x11\x08\x00", "JPEG without a frame header"),
])
def test_malformed_headers_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(SampleRejected, match=reason):
        image_header_size(data)


def test_limit_is_a_setting() -> None:
    assert ServerSettings().max_image_pixels == DEFAULT_MAX_PIXELS
    assert ServerSettings(max_image_pixels=2_000_000).max_image_pixels == 2_000_000
