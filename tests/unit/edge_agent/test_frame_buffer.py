"""The ring buffer of recent frames a correction can refer to: bounds, order, replacement, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_agent.frame_buffer import FrameBuffer
from edge_agent.inference.types import Detection

DET = Detection(1, 0.8, 10, 10, 40, 40)


def _img(value: int = 0, shape=(12, 16, 3)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


def test_get_returns_what_was_pushed() -> None:
    buf = FrameBuffer(4)
    img = _img(7)
    buf.push("f1", img, [DET], 3, ("a", "b"))
    got = buf.get("f1")
    assert got.frame_id == "f1" and got.image is img  # kept by reference, not copied
    assert got.detections == (DET,) and got.model_version == 3 and got.class_names == ("a", "b")
    assert buf.get("nope") is None


def test_count_bound_drops_the_oldest() -> None:
    buf = FrameBuffer(3)
    for i in range(5):
        buf.push(f"f{i}", _img(i), [], 1)
    assert len(buf) == 3
    assert buf.recent_ids() == ["f4", "f3", "f2"]  # newest first
    assert buf.get("f0") is None and buf.get("f1") is None


def test_byte_bound_drops_the_oldest_but_keeps_the_newest() -> None:
    one = _img().nbytes
    buf = FrameBuffer(100, max_bytes=2 * one)
    for i in range(4):
        buf.push(f"f{i}", _img(i), [], 1)
    assert buf.recent_ids() == ["f3", "f2"] and buf.nbytes == 2 * one
    big = np.zeros((100, 100, 3), np.uint8)  # alone over the cap: still the one the operator sees
    buf.push("big", big, [], 1)
    assert buf.recent_ids() == ["big"] and buf.nbytes == big.nbytes


def test_repeated_id_replaces_and_becomes_newest() -> None:
    buf = FrameBuffer(3)
    buf.push("a", _img(1), [], 1)
    buf.push("b", _img(2), [], 1)
    buf.push("a", _img(3), [DET], 2)
    assert buf.recent_ids() == ["a", "b"]
    assert buf.get("a").model_version == 2 and int(buf.get("a").image[0, 0, 0]) == 3
    assert buf.nbytes == 2 * _img().nbytes


def test_added_at_uses_the_clock() -> None:
    t = [100.0]
    buf = FrameBuffer(2, clock=lambda: t[0])
    buf.push("a", _img(), [], None)
    t[0] = 105.5
    buf.push("b", _img(), [], None)
    assert [f.added_at for f in buf.recent()] == [105.5, 100.0]


def test_invalid_capacity() -> None:
    with pytest.raises(ValueError):
        FrameBuffer(0)


def test_concurrent_push_and_get_keep_the_bounds() -> None:
    buf = FrameBuffer(16, max_bytes=10 * _img().nbytes)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(500):
                buf.push(f"w{k}-{i}", _img(i % 255), [DET], k)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(2000):
                for f in buf.recent():
                    assert f.image.shape == (12, 16, 3)
                assert len(buf) <= 10
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(buf) == 10 and buf.nbytes == 10 * _img().nbytes
