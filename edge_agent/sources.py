"""Frame sources. A folder source reads a YOLO label file beside each image as the line's
QA correction for that frame; other sources deliver frames without labels."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


@dataclass(frozen=True)
class Frame:
    frame_id: str
    image: np.ndarray  # BGR
    # Ground truth (cls, cx, cy, w, h normalised) when the line supplied a correction.
    labels: list[tuple[int, float, float, float, float]] | None = None


class SourceError(RuntimeError):
    pass


def read_yolo_labels(path: Path) -> list[tuple[int, float, float, float, float]] | None:
    if not path.exists():
        return None
    boxes = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise SourceError(f"{path}:{n}: expected 'class cx cy w h', got {line!r}")
        try:
            cls, coords = int(parts[0]), tuple(float(p) for p in parts[1:])
        except ValueError:
            raise SourceError(f"{path}:{n}: expected an integer class and four numbers, got {line!r}") from None
        if cls < 0 or not all(math.isfinite(v) for v in coords):
            raise SourceError(f"{path}:{n}: negative class id or non-finite coordinate in {line!r}")
        boxes.append((cls, *coords))
    return boxes


class FolderSource:
    def __init__(self, folder: Path, loop: bool = True) -> None:
        self._folder = Path(folder)
        self._loop = loop
        if not self._folder.is_dir():
            raise SourceError(f"source folder {self._folder} does not exist")

    def __iter__(self) -> Iterator[Frame]:
        while True:
            images = sorted(p for p in self._folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise SourceError(f"source folder {self._folder} holds no images")
            yielded = False
            for path in images:
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if image is None:
                    continue  # a half-written or corrupt file: skip, the line keeps running
                yielded = True
                yield Frame(path.stem, image, read_yolo_labels(path.with_suffix(".txt")))
            if not self._loop:
                return
            if not yielded:
                # Looping over a folder of only unreadable files would spin forever yielding nothing.
                raise SourceError(f"source folder {self._folder} holds no readable images")


class VideoSource:
    """A video file, stream URL or camera index through OpenCV, reconnecting with backoff."""

    def __init__(self, uri: str, loop: bool = True, max_backoff: float = 30.0) -> None:
        self._uri = int(uri) if uri.isdigit() else uri
        self._loop = loop
        self._max_backoff = max_backoff

    def __iter__(self) -> Iterator[Frame]:
        backoff, index = 1.0, 0
        while True:
            cap = cv2.VideoCapture(self._uri)
            if not cap.isOpened():
                time.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = 1.0
            while True:
                ok, image = cap.read()
                if not ok:
                    break
                index += 1
                yield Frame(f"f{index:09d}", image)
            cap.release()
            if not self._loop and isinstance(self._uri, str) and Path(self._uri).exists():
                return


def open_source(spec: str, loop: bool = True):
    if spec.startswith("folder:"):
        return FolderSource(Path(spec[len("folder:"):]), loop=loop)
    if not spec:
        raise SourceError("no frame source configured (EDGELOOP_AGENT_SOURCE)")
    return VideoSource(spec, loop=loop)
