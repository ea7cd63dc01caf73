"""Perceptual-hash near-duplicate suppression: same scene under noise or JPEG is caught, a
different scene is not, windows are per reason and bounded."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from edge_agent.dedup import HASH_BITS, NearDuplicateIndex, compared_against, hamming, perceptual_hash
from protocol.messages import SampleReason

THRESHOLD = 24  # the settings default


def scene(seed: int, w: int = 320, h: int = 240) -> np.ndarray:
    """A 'scene': a background and six filled shapes, all placed by the seed."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rng.integers(40, 200, 3)
    for _ in range(6):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x1, y1 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        if rng.random() < 0.5:
            x2, y2 = x1 + int(rng.integers(15, w // 2)), y1 + int(rng.integers(15, h // 2))
            cv2.rectangle(img, (x1, y1), (x2, y2), color, -1)
        else:
            cv2.circle(img, (x1, y1), int(rng.integers(8, w // 8)), color, -1)
    return img


def noisy(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.int16) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR)


def test_hash_is_256_packed_bits_and_deterministic() -> None:
    img = scene(1)
    h = perceptual_hash(img)
    assert h.dtype == np.uint8 and h.shape == (HASH_BITS // 8,)
    assert np.array_equal(h, perceptual_hash(img.copy()))
    assert hamming(h, h) == 0


def test_grey_and_colour_frames_of_one_scene_hash_alike() -> None:
    img = scene(2)
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    assert hamming(perceptual_hash(img), perceptual_hash(grey)) == 0


@pytest.mark.parametrize("seed", range(10))
def test_same_scene_with_noise_or_jpeg_is_within_threshold(seed: int) -> None:
    img = scene(seed)
    h = perceptual_hash(img)
    assert hamming(h, perceptual_hash(noisy(img, 6, seed + 100))) <= THRESHOLD
    assert hamming(h, perceptual_hash(jpeg(img, 70))) <= THRESHOLD
    # Resolution does not matter: the same scene from a lower-resolution stream.
    small = cv2.resize(img, (160, 120), interpolation=cv2.INTER_AREA)
    assert hamming(h, perceptual_hash(small)) <= THRESHOLD


def test_different_scenes_are_far_apart() -> None:
    hashes = [perceptual_hash(scene(s)) for s in range(30)]
    distances = [hamming(a, b) for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) > 2 * THRESHOLD


def test_a_moved_part_is_not_a_duplicate() -> None:
    # Same belt and part, part shifted by a third of the frame: a new scene for the model.
    belt = np.full((240, 320, 3), 70, np.uint8)
    a, b = belt.copy(), belt.copy()
    cv2.rectangle(a, (20, 60), (120, 180), (200, 200, 200), -1)
    cv2.rectangle(b, (180, 60), (280, 180), (200, 200, 200), -1)
    assert hamming(perceptual_hash(a), perceptual_hash(b)) > THRESHOLD


def test_index_flags_noisy_repeat_and_keeps_new_scene() -> None:
    idx = NearDuplicateIndex(THRESHOLD, window=8)
    first = perceptual_hash(scene(5))
    assert not idx.is_duplicate(SampleReason.LOW_CONFIDENCE, first)
    idx.add(SampleReason.LOW_CONFIDENCE, first)
    assert idx.is_duplicate(SampleReason.LOW_CONFIDENCE, perceptual_hash(noisy(scene(5), 6, 1)))
    assert not idx.is_duplicate(SampleReason.LOW_CONFIDENCE, perceptual_hash(scene(6)))
    assert idx.nearest(first, [SampleReason.LOW_CONFIDENCE]) == 0
    assert idx.nearest(first, [SampleReason.RANDOM]) is None


def test_correction_is_only_compared_with_corrections() -> None:
    idx = NearDuplicateIndex(THRESHOLD, window=8)
    h = perceptual_hash(scene(7))
    for reason in (SampleReason.LOW_CONFIDENCE, SampleReason.RANDOM, SampleReason.SHADOW_DISAGREEMENT):
        idx.add(reason, h)
    assert not idx.is_duplicate(SampleReason.CORRECTION, h)  # a label is worth keeping
    idx.add(SampleReason.CORRECTION, h)
    assert idx.is_duplicate(SampleReason.CORRECTION, perceptual_hash(noisy(scene(7), 6, 2)))


def test_unlabeled_sample_is_compared_with_every_reason() -> None:
    assert compared_against(SampleReason.CORRECTION) == (SampleReason.CORRECTION,)
    idx = NearDuplicateIndex(THRESHOLD, window=8)
    h = perceptual_hash(scene(8))
    idx.add(SampleReason.CORRECTION, h)
    for reason in (SampleReason.LOW_CONFIDENCE, SampleReason.RANDOM, SampleReason.SHADOW_DISAGREEMENT):
        assert idx.is_duplicate(reason, h)


def test_window_forgets_the_oldest_hash_per_reason() -> None:
    idx = NearDuplicateIndex(THRESHOLD, window=2)
    hashes = [perceptual_hash(scene(s)) for s in range(3)]
    for h in hashes:
        idx.add(SampleReason.RANDOM, h)
    assert len(idx) == 2
    assert not idx.is_duplicate(SampleReason.RANDOM, hashes[0])
    assert idx.is_duplicate(SampleReason.RANDOM, hashes[1]) and idx.is_duplicate(SampleReason.RANDOM, hashes[2])
    # Another reason's window is separate: filling it does not push out RANDOM's hashes.
    for s in range(10, 14):
        idx.add(SampleReason.CORRECTION, perceptual_hash(scene(s)))
    assert idx.is_duplicate(SampleReason.RANDOM, hashes[2])


def test_window_zero_disables_and_distance_zero_means_identical_only() -> None:
    off = NearDuplicateIndex(THRESHOLD, window=0)
    h = perceptual_hash(scene(9))
    off.add(SampleReason.RANDOM, h)
    assert not off.enabled and len(off) == 0 and not off.is_duplicate(SampleReason.RANDOM, h)
    exact = NearDuplicateIndex(0, window=4)
    exact.add(SampleReason.RANDOM, h)
    assert exact.is_duplicate(SampleReason.RANDOM, h)
    flipped = h.copy()
    flipped[0] ^= 1
    assert not exact.is_duplicate(SampleReason.RANDOM, flipped)


@pytest.mark.parametrize(("distance", "window"), [(-1, 4), (HASH_BITS + 1, 4), (4, -1)])
def test_invalid_settings_are_refused(distance: int, window: int) -> None:
    with pytest.raises(ValueError):
        NearDuplicateIndex(distance, window)
