"""The most recent frames by id, so a correction posted seconds later still finds the pixels and
what the model said about them.

Bounded by count and by bytes (oldest leave first): a 1080p BGR frame is 6 MB, and the buffer
must not be what runs a small device out of memory. Frames are kept by reference, not copied:
the frame loop must not write into an image after pushing it (sources hand out fresh arrays).
Thread-safe: the frame loop pushes, the HMI thread reads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.inference.types import Detection


@dataclass(frozen=True)
class BufferedFrame:
    frame_id: str
    image: np.ndarray
    detections: tuple[Detection, ...]
    model_version: int | None
    # The class names of the model that produced ``detections``; None when unknown.
    class_names: tuple[str, ...] | None
    added_at: float  # monotonic seconds


class FrameBuffer:
    def __init__(self, max_frames: int, max_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._clock = clock
        self._frames: OrderedDict[str, BufferedFrame] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def push(self, frame_id: str, image: np.ndarray, detections: Sequence[Detection],
             model_version: int | None, class_names: Sequence[str] | None = None) -> None:
        """Remember a frame; a repeated id (a looping folder source) replaces the older entry."""
        entry = BufferedFrame(frame_id, image, tuple(detections), model_version,
                              tuple(class_names) if class_names is not None else None, self._clock())
        with self._lock:
            old = self._frames.pop(frame_id, None)
            if old is not None:
                self._bytes -= old.image.nbytes
            self._frames[frame_id] = entry
            self._bytes += image.nbytes
            # The newest frame always stays, even alone over max_bytes: it is the one an operator sees.
            while len(self._frames) > 1 and (
                len(self._frames) > self.max_frames or (self.max_bytes is not None and self._bytes > self.max_bytes)
            ):
                _, gone = self._frames.popitem(last=False)
                self._bytes -= gone.image.nbytes

    def get(self, frame_id: str) -> BufferedFrame | None:
        with self._lock:
            return self._frames.get(frame_id)

    def recent(self) -> list[BufferedFrame]:
        """Every frame still held, newest first."""
        with self._lock:
            return list(reversed(self._frames.values()))

    def recent_ids(self) -> list[str]:
        return [f.frame_id for f in self.recent()]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)
