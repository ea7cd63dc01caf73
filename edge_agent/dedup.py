"""Near-duplicate suppression: a perceptual hash (DCT pHash, as ImageHash computes it) per accepted sample,
compared by Hamming distance against a window of recent accepted hashes per reason.

A stopped line or a camera staring at the same part yields frames that differ only by sensor
noise; sending each of them costs upload and labelling time and teaches the model nothing new.

Measured on the synthetic line (224 px, 300 frames in each of 5 scenarios, 256-bit hash, this
OpenCV DCT): Gaussian noise of sigma 8 grey levels plus JPEG q70 moves a hash by 18 bits at p99
(32 at most); two different frames were never closer than 34 bits. The default threshold of 24
keeps every distinct frame and suppresses nearly all noisy repeats; a repeat that slips through
costs one upload, a distinct frame wrongly dropped would cost a lesson.

The hash is ImageHash's pHash computed with OpenCV's DCT, which the device has anyway:
ImageHash would pull SciPy, Pillow and PyWavelets (~175 MB) onto every edge device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import cv2
import numpy as np

from protocol.messages import SampleReason

HASH_SIZE = 16  # 16x16 = 256 bits: a 64-bit hash put distinct synthetic frames as close as 4 bits
HASH_BITS = HASH_SIZE * HASH_SIZE
# pHash looks at a 4*HASH_SIZE square (ImageHash's highfreq_factor of 4), shrunk anti-aliased.
_DCT_SIZE = 4 * HASH_SIZE


def perceptual_hash(image: np.ndarray) -> np.ndarray:
    """256-bit DCT perceptual hash of a BGR (or grey) frame, packed into 32 bytes.

    Grey, shrink to 64x64, 2-D DCT, keep the 16x16 lowest frequencies, one bit per coefficient:
    above their median or not.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    small = cv2.resize(grey, (_DCT_SIZE, _DCT_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:HASH_SIZE, :HASH_SIZE]
    return np.packbits((low > np.median(low)).reshape(-1))


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def compared_against(reason: SampleReason) -> tuple[SampleReason, ...]:
    """The windows a new sample of ``reason`` is checked against.

    A correction carries a label, so it is kept even when an unlabeled sample of the same scene
    was sent; only another correction of that scene makes it redundant. An unlabeled sample
    adds nothing next to any sample of the same scene already sent, labeled or not.
    """
    if reason is SampleReason.CORRECTION:
        return (SampleReason.CORRECTION,)
    return tuple(SampleReason)


class NearDuplicateIndex:
    """The last ``window`` accepted hashes per reason. Not thread-safe: the collector locks it."""

    def __init__(self, max_distance: int, window: int) -> None:
        if not 0 <= max_distance <= HASH_BITS:
            raise ValueError(f"max_distance must be in [0, {HASH_BITS}], got {max_distance}")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.max_distance = max_distance
        self.window = window
        self._hashes: dict[SampleReason, deque[np.ndarray]] = {r: deque(maxlen=window or 1) for r in SampleReason}

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def nearest(self, h: np.ndarray, reasons: Iterable[SampleReason]) -> int | None:
        """Smallest Hamming distance from ``h`` to a stored hash of ``reasons``; None when none stored."""
        stored = [x for r in reasons for x in self._hashes[r]]
        if not stored:
            return None
        diff = np.bitwise_xor(np.stack(stored), h[None, :])
        return int(np.unpackbits(diff, axis=1).sum(axis=1).min())

    def is_duplicate(self, reason: SampleReason, h: np.ndarray) -> bool:
        if not self.enabled:
            return False
        distance = self.nearest(h, compared_against(reason))
        return distance is not None and distance <= self.max_distance

    def add(self, reason: SampleReason, h: np.ndarray) -> None:
        if self.enabled:
            self._hashes[reason].append(h)

    def __len__(self) -> int:
        return sum(len(q) for q in self._hashes.values())
