"""The data contract reads an image's sides and pixel count from its header before decoding
(issue 10, bad input): a tiny PNG declaring 20000x20000 is rejected with the size reason and
never decoded. The header parser is the one ingest uses (training.image_header)."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest

import server.sample_validation as sample_validation
import training.image_header as image_header
from training import data_contract
from training.data_contract import Candidate, ContractLimits, ContractViolation, DataContract, decode_image

NAMES = ("scratch", "dent", "stain")
BOX = [{"cls": 0, "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2}]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR for width x height and only a few rows of (zero) pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(1 + min(width, 64)) * 4)
    return image_header.PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(data_contract.cv2, "imdecode", refuse)


def test_header_claiming_20000_squared_is_rejected_without_decoding(no_decode: None) -> None:
    bomb = _png_claiming(20_000, 20_000)
    assert len(bomb) < 1024
    tracemalloc.start()
    try:
        with pytest.raises(ContractViolation, match=r"20000x20000; sides must lie in \[16, 4096\]"):
            decode_image(bomb, ContractLimits(NAMES))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"the contract peaked at {peak} bytes"


def test_the_batch_keeps_the_size_reason_and_goes_on(no_decode: None) -> None:
    report = DataContract(ContractLimits(NAMES)).check_batch([Candidate("big", _png_claiming(20_000, 20_000),
                                                                        list(BOX), "cam-1")])
    assert report.rejected == {"big": "image is 20000x20000; sides must lie in [16, 4096]"}
    assert report.accepted == []


def test_pixel_count_is_checked_from_the_header(no_decode: None) -> None:
    limits = ContractLimits(NAMES, max_side=10**6, max_pixels=12_000_000)
    with pytest.raises(ContractViolation, match=r"4000x4000 \(16000000 pixels\), over the 12000000-pixel limit"):
        decode_image(_png_claiming(4000, 4000), limits)
    assert ContractLimits(NAMES).max_pixels == image_header.DEFAULT_MAX_PIXELS


@pytest.mark.parametrize(("data", "reason"), [
    (image_header.PNG_SIGNATURE + bytes(10), "PNG without an IHDR"),
    (b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20, "JPEG without a frame header"),
    (image_header.PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 0, 0, 0, 0)), "declares 0x10"),
])
def test_a_bad_header_is_a_contract_violation(data: bytes, reason: str, no_decode: None) -> None:
    with pytest.raises(ContractViolation, match=reason):
        decode_image(data, ContractLimits(NAMES))


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_normal_images_still_decode(ext: str) -> None:
    image = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    data = cv2.imencode(ext, image)[1].tobytes()
    assert decode_image(data, ContractLimits(NAMES)).shape == (120, 160, 3)


def test_ingest_and_the_contract_share_one_parser() -> None:
    bomb = _png_claiming(20_000, 20_000)
    assert image_header.image_header_size(bomb) == ("PNG", 20_000, 20_000)
    assert sample_validation.image_header_size(bomb) == ("PNG", 20_000, 20_000)
    # server.sample_validation wraps training.image_header's parser; it has no copy of its own.
    assert sample_validation._header_size is image_header.image_header_size
    assert not hasattr(sample_validation, "_jpeg_frame_size")
    with pytest.raises(sample_validation.SampleRejected, match="PNG without an IHDR"):
        sample_validation.image_header_size(image_header.PNG_SIGNATURE + bytes(10))
