"""Drift statistics: the per-frame measurements and fixed-bin histograms drift is judged on.

This module is the ONE place these statistics are defined. The device accumulates them over a
window (``edge_agent.drift``), and the training side computes a model version's reference from its
training images with the very same code (``training.drift_reference``); the server reads the
metric names and edges from here. That is why it is the package-boundary test's single, explicit
exception: ``training`` and ``server`` may import ``edge_agent.drift_stats`` and nothing else of
the agent. Keep it that way: numpy and OpenCV only, no other ``edge_agent`` import, no I/O.

Per frame (cheap: one 64-pixel thumbnail and a few OpenCV reductions, ~60 us on 2 CPU cores):

* ``brightness`` -- mean grey level, 0..1
* ``contrast`` -- standard deviation of the grey levels, 0..0.5
* ``sharpness`` -- log10(1 + variance of the Laplacian) of the thumbnail's grey levels
* ``saturation`` -- mean HSV saturation of 8x8 block colours, 0..1
* ``chroma_r`` / ``chroma_b`` -- share of red / blue in the mean colour, R/(R+G+B) and B/(R+G+B)

Per detection: ``confidence`` (all classes) and ``confidence/<class id>``; per frame
``detections_per_frame``; and ``class_frequency`` (one bin per class id).

Edges are fixed (never data-dependent), so histograms from any device, window and reference line
up bin for bin and add. Values outside the edges fall into the end bins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np

#: Version of the definitions below; part of every reference, so an old reference is never
#: compared with histograms computed differently.
STATS_VERSION = 1

#: Side of the square thumbnail image statistics are computed on: makes them independent of the
#: camera's resolution and keeps their cost flat.
THUMBNAIL = 64

BRIGHTNESS, CONTRAST, SHARPNESS, SATURATION, CHROMA_R, CHROMA_B = (
    "brightness", "contrast", "sharpness", "saturation", "chroma_r", "chroma_b")
IMAGE_METRICS: tuple[str, ...] = (BRIGHTNESS, CONTRAST, SHARPNESS, SATURATION, CHROMA_R, CHROMA_B)
CONFIDENCE = "confidence"
DETECTIONS_PER_FRAME = "detections_per_frame"
CLASS_FREQUENCY = "class_frequency"
#: More classes than this get no histogram of their own (protocol caps a report at 64 histograms).
MAX_CLASS_HISTOGRAMS = 48
MAX_DETECTIONS_BIN = 16


def _lin(lo: float, hi: float, bins: int) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in np.linspace(lo, hi, bins + 1))


#: Fixed bin edges per metric (class-frequency edges depend on the class count: see ``edges_for``).
EDGES: dict[str, tuple[float, ...]] = {
    BRIGHTNESS: _lin(0.0, 1.0, 32),
    CONTRAST: _lin(0.0, 0.5, 32),
    SHARPNESS: _lin(0.0, 4.8, 32),
    SATURATION: _lin(0.0, 1.0, 32),
    CHROMA_R: _lin(0.0, 0.64, 32),
    CHROMA_B: _lin(0.0, 0.64, 32),
    CONFIDENCE: _lin(0.0, 1.0, 20),
    DETECTIONS_PER_FRAME: tuple(float(v) for v in range(MAX_DETECTIONS_BIN + 1)),
}


def confidence_metric(class_id: int) -> str:
    return f"{CONFIDENCE}/{int(class_id)}"


def class_of(metric: str) -> int | None:
    """The class id of a ``confidence/<id>`` metric, else None."""
    prefix = CONFIDENCE + "/"
    if metric.startswith(prefix) and metric[len(prefix):].isdigit():
        return int(metric[len(prefix):])
    return None


def edges_for(metric: str, num_classes: int) -> tuple[float, ...]:
    if metric == CLASS_FREQUENCY:
        return tuple(float(v) for v in range(max(1, num_classes) + 1))
    if class_of(metric) is not None:
        return EDGES[CONFIDENCE]
    return EDGES[metric]


def image_stats(image: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """The ``IMAGE_METRICS`` of one BGR (or grey) uint8 frame, in that order."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    # INTER_LINEAR samples the frame at the thumbnail's grid: ~30 us at any input size, where
    # INTER_AREA costs milliseconds on a 1080p frame. The statistics are means over the grid, so
    # sampling (not averaging) keeps them unbiased; sharpness is measured at the thumbnail's scale.
    thumb = cv2.resize(image, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_LINEAR)
    grey = cv2.cvtColor(thumb, cv2.COLOR_BGR2GRAY)
    mean, std = cv2.meanStdDev(grey)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    # Saturation of 8x8 block colours, not of pixels: on a grey part per-pixel saturation is mostly
    # sensor chroma noise, which JPEG (training images, uploaded samples) smooths away.
    blocks = cv2.resize(thumb, (8, 8), interpolation=cv2.INTER_AREA)
    saturation = cv2.mean(cv2.cvtColor(blocks, cv2.COLOR_BGR2HSV))[1]
    b, g, r, _ = cv2.mean(thumb)
    total = b + g + r or 1.0
    return (float(mean[0, 0]) / 255.0, float(std[0, 0]) / 255.0,
            math.log10(1.0 + float(lap_std[0, 0]) ** 2), saturation / 255.0, r / total, b / total)


def histogram(values: Sequence[float] | np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts of ``values`` in fixed ``edges``; values outside fall into the end bins."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return np.zeros(len(edges) - 1, dtype=np.int64)
    # Clip just inside the last edge: np.histogram's last bin is closed, so the top edge counts.
    clipped = np.clip(arr, edges[0], edges[-1])
    counts, _ = np.histogram(clipped, bins=np.asarray(edges, dtype=np.float64))
    return counts.astype(np.int64)


class StatsAccumulator:
    """Histograms of a stream of frames. Per frame it only appends numbers to lists; binning is
    vectorised and done every ``fold_every`` frames and at ``histograms()``, so memory stays bounded
    however long a window is."""

    def __init__(self, num_classes: int, *, fold_every: int = 2048) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        self.num_classes = int(num_classes)
        self._fold_every = fold_every
        self._class_hists = min(self.num_classes, MAX_CLASS_HISTOGRAMS)
        self.frames = 0
        self.image_frames = 0
        self.detections = 0
        self._images: list[tuple[float, ...]] = []
        self._conf: list[float] = []
        self._cls: list[int] = []
        self._per_frame: list[int] = []
        self._counts: dict[str, np.ndarray] = {
            name: np.zeros(len(edges_for(name, self.num_classes)) - 1, dtype=np.int64) for name in self.metrics()
        }

    def metrics(self) -> list[str]:
        return [*IMAGE_METRICS, CONFIDENCE, *(confidence_metric(c) for c in range(self._class_hists)),
                DETECTIONS_PER_FRAME, CLASS_FREQUENCY]

    def add_image(self, image: np.ndarray) -> None:
        self.add_image_stats(image_stats(image))

    def add_image_stats(self, values: Sequence[float]) -> None:
        """A frame's ``image_stats`` computed earlier (benchmarks replay recorded frames this way)."""
        self._images.append(tuple(values))
        self.image_frames += 1

    def add_detections(self, classes: Sequence[int], confidences: Sequence[float]) -> None:
        """One frame's detections (an empty frame counts: it is a 0 in ``detections_per_frame``)."""
        n = len(classes)
        if n:
            self._cls.extend(classes)
            self._conf.extend(confidences)
            self.detections += n
        self._per_frame.append(n)
        self.frames += 1
        if len(self._per_frame) >= self._fold_every or len(self._images) >= self._fold_every:
            self._fold()

    def _fold(self) -> None:
        if self._images:
            values = np.asarray(self._images, dtype=np.float64)
            for i, name in enumerate(IMAGE_METRICS):
                self._counts[name] += histogram(values[:, i], EDGES[name])
            self._images.clear()
        if self._per_frame:
            self._counts[DETECTIONS_PER_FRAME] += histogram(self._per_frame, EDGES[DETECTIONS_PER_FRAME])
            self._per_frame.clear()
        if self._cls:
            cls = np.asarray(self._cls, dtype=np.int64)
            conf = np.asarray(self._conf, dtype=np.float64)
            self._counts[CONFIDENCE] += histogram(conf, EDGES[CONFIDENCE])
            known = (cls >= 0) & (cls < self.num_classes)
            self._counts[CLASS_FREQUENCY] += np.bincount(cls[known], minlength=self.num_classes)[: self.num_classes]
            for c in np.unique(cls[known]):
                if c < self._class_hists:
                    self._counts[confidence_metric(int(c))] += histogram(conf[cls == c], EDGES[CONFIDENCE])
            self._cls.clear()
            self._conf.clear()

    def histograms(self) -> dict[str, tuple[tuple[float, ...], list[int]]]:
        """``{metric: (edges, counts)}`` for every metric (empty ones included, all zeros)."""
        self._fold()
        return {name: (edges_for(name, self.num_classes), counts.tolist()) for name, counts in self._counts.items()}


def merge_histograms(
    parts: Iterable[Mapping[str, tuple[Sequence[float], Sequence[int]]]],
) -> dict[str, tuple[tuple[float, ...], list[int]]]:
    """Sum histograms metric by metric; a metric whose edges differ between parts is dropped."""
    out: dict[str, tuple[tuple[float, ...], np.ndarray]] = {}
    clash: set[str] = set()
    for part in parts:
        for name, (edges, counts) in part.items():
            edges = tuple(float(e) for e in edges)
            if name in out:
                if out[name][0] != edges:
                    clash.add(name)
                    continue
                out[name] = (edges, out[name][1] + np.asarray(counts, dtype=np.int64))
            else:
                out[name] = (edges, np.asarray(counts, dtype=np.int64).copy())
    return {name: (edges, counts.tolist()) for name, (edges, counts) in out.items() if name not in clash}
