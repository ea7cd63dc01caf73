"""Device drift statistics (edge_agent.drift_stats) and the per-window accumulator (edge_agent.drift)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import cv2
import numpy as np
import pytest

from edge_agent.drift import DriftSettings, DriftWindow
from edge_agent.drift_stats import (
    BRIGHTNESS,
    CHROMA_B,
    CHROMA_R,
    CLASS_FREQUENCY,
    CONFIDENCE,
    CONTRAST,
    DETECTIONS_PER_FRAME,
    EDGES,
    IMAGE_METRICS,
    MAX_CLASS_HISTOGRAMS,
    SATURATION,
    SHARPNESS,
    StatsAccumulator,
    class_of,
    confidence_metric,
    histogram,
    image_stats,
    merge_histograms,
)
from protocol import decode_message, device_topic, encode_message
from protocol.messages import DriftReport
from protocol.topics import Channel


@dataclass(frozen=True)
class Det:
    cls: int
    conf: float


def _stats(image: np.ndarray) -> dict[str, float]:
    return dict(zip(IMAGE_METRICS, image_stats(image), strict=True))


def test_image_statistics_measure_what_they_name():
    grey = _stats(np.full((120, 160, 3), 102, np.uint8))
    assert grey[BRIGHTNESS] == pytest.approx(102 / 255, abs=1e-6)
    assert grey[CONTRAST] == pytest.approx(0.0, abs=1e-6)
    assert grey[SHARPNESS] == pytest.approx(0.0, abs=1e-6)
    assert grey[SATURATION] == pytest.approx(0.0, abs=1e-6)
    assert grey[CHROMA_R] == pytest.approx(1 / 3) and grey[CHROMA_B] == pytest.approx(1 / 3)

    red = _stats(np.dstack([np.zeros((64, 64)), np.zeros((64, 64)), np.full((64, 64), 200)]).astype(np.uint8))
    assert red[SATURATION] == pytest.approx(1.0) and red[CHROMA_R] == pytest.approx(1.0) and red[CHROMA_B] == 0

    checker = np.kron((np.indices((16, 16)).sum(axis=0) % 2) * 255, np.ones((8, 8))).astype(np.uint8)
    sharp = _stats(checker)  # a grey frame is accepted too
    blurred = _stats(cv2.GaussianBlur(checker, (0, 0), 4))
    assert sharp[CONTRAST] > 0.4 and sharp[SHARPNESS] > blurred[SHARPNESS] + 1.0


def test_image_statistics_do_not_depend_on_resolution_or_jpeg():
    from training.synth import render_frame

    for index in range(5):
        frame, _ = render_frame("base", 3, index, 160)
        small, big = _stats(frame), _stats(cv2.resize(frame, (640, 640), interpolation=cv2.INTER_CUBIC))
        _, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 75])
        stored = _stats(cv2.imdecode(jpeg, cv2.IMREAD_COLOR))
        for name in IMAGE_METRICS:
            width = EDGES[name][1] - EDGES[name][0]
            # Within one histogram bin: a reference from stored JPEGs lines up with live frames.
            assert abs(small[name] - stored[name]) < width, (name, small[name], stored[name])
            if name != SHARPNESS:  # sharpness is measured at the thumbnail's scale: upscaling blurs
                assert abs(small[name] - big[name]) < width, (name, small[name], big[name])


def test_histogram_uses_fixed_edges_and_clips_into_the_end_bins():
    edges = (0.0, 0.5, 1.0)
    assert histogram([-3, 0.1, 0.5, 1.0, 7], edges).tolist() == [2, 3]
    assert histogram([], edges).tolist() == [0, 0]


def test_accumulator_counts_detections_per_class_and_folds_without_losing_anything():
    rng = np.random.default_rng(0)
    frames = [[Det(int(c), float(p)) for c, p in zip(rng.integers(0, 3, n), rng.uniform(0.25, 1, n), strict=True)]
              for n in rng.integers(0, 5, 50)]
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(50)]
    eager, lazy = StatsAccumulator(3, fold_every=3), StatsAccumulator(3)
    for acc in (eager, lazy):
        for image, dets in zip(images, frames, strict=True):
            acc.add_image(image)
            acc.add_detections([d.cls for d in dets], [d.conf for d in dets])
    assert eager.histograms() == lazy.histograms()
    hists = lazy.histograms()
    total = sum(len(d) for d in frames)
    assert sum(hists[CONFIDENCE][1]) == total == lazy.detections
    assert hists[CLASS_FREQUENCY][1] == [sum(d.cls == c for f in frames for d in f) for c in range(3)]
    assert sum(hists[confidence_metric(1)][1]) == hists[CLASS_FREQUENCY][1][1]
    assert hists[DETECTIONS_PER_FRAME][1][0] == sum(1 for f in frames if not f)  # empty frames count
    assert all(sum(hists[m][1]) == 50 for m in IMAGE_METRICS)
    assert class_of(confidence_metric(7)) == 7 and class_of(CONFIDENCE) is None


def test_many_classes_keep_the_report_within_the_protocol_limits():
    acc = StatsAccumulator(200)
    acc.add_detections([0, 150, 199, 250], [0.5, 0.6, 0.7, 0.8])  # 250: not a class of this model
    hists = acc.histograms()
    assert len(hists) <= 64 and confidence_metric(MAX_CLASS_HISTOGRAMS) not in hists
    assert sum(hists[CLASS_FREQUENCY][1]) == 3 and hists[CLASS_FREQUENCY][1][150] == 1


def test_merge_sums_matching_histograms_and_drops_mismatched_edges():
    a = {"x": ((0.0, 1.0, 2.0), [1, 2]), "y": ((0.0, 1.0), [5])}
    b = {"x": ((0.0, 1.0, 2.0), [3, 4]), "y": ((0.0, 2.0), [1])}
    assert merge_histograms([a, b]) == {"x": ((0.0, 1.0, 2.0), [4, 6])}


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_window_is_due_by_frames_or_time_but_never_below_min_frames():
    clock = Clock()
    image = np.zeros((16, 16, 3), np.uint8)
    window = DriftWindow(DriftSettings(window_frames=10, window_seconds=60, min_frames=4), 3, clock=clock)
    for _ in range(3):
        window.add(image, [])
    clock.t += 120
    assert not window.due()  # time is up, but 3 frames say too little
    window.add(image, [])
    assert window.due()
    window.report("cam-1", 2)
    for _ in range(9):
        window.add(image, [])
    assert not window.due()
    window.add(image, [])
    assert window.due()
    with pytest.raises(ValueError):
        DriftWindow(DriftSettings(window_frames=0, window_seconds=0), 3)


def test_report_is_a_valid_drift_message_and_opens_the_next_window():
    started = datetime(2026, 11, 29, 12, tzinfo=UTC)
    window = DriftWindow(DriftSettings(window_frames=5, min_frames=1, image_every=2), 3, now=lambda: started)
    image = np.full((48, 64, 3), 90, np.uint8)
    verdicts = [True, False, None, False, None, None]
    for verdict in verdicts:
        window.add(image, [Det(0, 0.9), Det(2, 0.4)], verdict)
    window.add_qa(True)  # a correction the HMI sent about an earlier frame
    report = window.report("cam-1", 4)
    assert (report.window, report.frames, report.model_version, report.started_at) == (0, 6, 4, started)
    assert report.qa_frames == 4 and report.correction_rate == pytest.approx(2 / 4)
    assert sum(report.histograms[BRIGHTNESS].counts) == 3  # image_every=2
    assert report.histograms[CLASS_FREQUENCY].counts == [6, 0, 6]
    payload = encode_message(report)
    assert decode_message(device_topic("cam-1", Channel.DRIFT), payload) == report
    nxt = window.report("cam-1", 4)
    assert nxt.window == 1 and nxt.frames == 0 and nxt.correction_rate is None and nxt.qa_frames == 0


def test_restart_drops_the_open_window():
    window = DriftWindow(DriftSettings(window_frames=5, min_frames=1), 3)
    window.add(np.zeros((8, 8, 3), np.uint8), [Det(1, 0.5)], True)
    window.restart()
    assert window.frames == 0 and window.report("cam-1", None).qa_frames == 0


def test_agent_settings_carry_the_drift_block(monkeypatch):
    from edge_agent.settings import AgentSettings

    monkeypatch.setenv("EDGELOOP_AGENT_DRIFT", '{"window_frames": 300, "window_seconds": 60}')
    settings = AgentSettings(device_id="cam-1")
    assert settings.drift.window_frames == 300 and settings.drift.window_seconds == 60
    assert settings.drift.enabled and isinstance(DriftReport, type)
