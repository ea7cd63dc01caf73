"""An image's format and dimensions read from its header, decoding nothing.

The one parser both ingest (``server.sample_validation``) and the data contract
(``training.data_contract``) use, so that a small file declaring a huge image is rejected before
its pixels are allocated. Standard library only: ``server`` imports ``training``, never the
reverse (DESIGN.md, package boundaries), so this lives here.
"""

from __future__ import annotations

import struct

DEFAULT_MAX_PIXELS = 4096 * 4096  # ~50 MB once decoded to 8-bit BGR

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic):
# every 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field


class ImageHeaderError(ValueError):
    """The header is missing, cut short, of an unknown format, or declares no size."""


def image_header_size(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` read from a PNG's IHDR or a JPEG's frame header, decoding nothing.

    ``format`` is ``"PNG"`` or ``"JPEG"``; anything else is rejected, as is a header that is cut
    short or declares no size.
    """
    if data.startswith(PNG_SIGNATURE):
        # The IHDR chunk must come first: length 13, type, width, height (big-endian uint32).
        if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
            raise ImageHeaderError("image does not decode (PNG without an IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        fmt = "PNG"
    elif data.startswith(JPEG_SOI):
        width, height = _jpeg_frame_size(data)
        fmt = "JPEG"
    else:
        raise ImageHeaderError("image does not decode (not a JPEG or PNG)")
    if width == 0 or height == 0 or width > 2**31 - 1 or height > 2**31 - 1:
        raise ImageHeaderError(f"image does not decode ({fmt} header declares {width}x{height})")
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
    raise ImageHeaderError("image does not decode (JPEG without a frame header)")
