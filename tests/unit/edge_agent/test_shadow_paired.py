"""The shadow window's paired outcomes: on known-truth frames, which model alone was right; and an
HMI correction that arrives after both models ran on a frame joins the comparison (once), within
the window or a later one, while the frame is still buffered."""

from __future__ import annotations

import numpy as np

from edge_agent.hmi import CorrectionApi
from edge_agent.inference.types import Detection, InferenceResult
from edge_agent.shadow import ShadowItem, ShadowRunner

DEFECT = Detection(0, 0.9, 10, 10, 20, 20)
ELSEWHERE = Detection(0, 0.9, 40, 40, 50, 50)


class FixedDetector:
    def __init__(self, boxes: list[Detection]) -> None:
        self.boxes = boxes

    def infer(self, image):
        return InferenceResult(detections=tuple(self.boxes), latency_ms=1.0)


def _item(frame_id: str, active: list[Detection], truths: list[Detection] | None) -> ShadowItem:
    return ShadowItem(np.zeros((64, 64, 3), np.uint8), active, 1.0, truths, frame_id)


def _feed(runner: ShadowRunner, *items: ShadowItem) -> None:
    for item in items:
        assert runner.offer(item)
        assert runner.wait_idle(10)


def test_known_frames_count_which_model_alone_was_right():
    runner = ShadowRunner(FixedDetector([DEFECT]), 100)  # the candidate always finds DEFECT
    try:
        _feed(runner,
              _item("a", [ELSEWHERE], [DEFECT]),  # only the candidate right
              _item("b", [DEFECT], [DEFECT]),  # both right
              _item("c", [DEFECT], [ELSEWHERE]),  # both wrong
              _item("d", [], []),  # the active model right (nothing there), the candidate not
              _item("e", [ELSEWHERE], None))  # no truth: not a known frame
        report = runner.report()
    finally:
        runner.close()
    assert report["corrected_frames"] == 4
    assert (report["candidate_only_correct"], report["active_only_correct"]) == (1, 1)
    assert report["active_accuracy"] == 0.5 and report["candidate_accuracy"] == 0.5


def test_a_late_correction_joins_the_comparison_once_and_survives_into_the_next_window():
    runner = ShadowRunner(FixedDetector([DEFECT]), 100, pending_truth=2)
    try:
        _feed(runner, _item("f1", [], None), _item("f2", [], None), _item("f3", [DEFECT], None))
        assert not runner.judge_late("f1", [DEFECT])  # pushed out: only the 2 newest are kept
        assert runner.judge_late("f2", [DEFECT])  # only the candidate found the defect
        assert not runner.judge_late("f2", [DEFECT])  # once per frame
        assert not runner.judge_late("never-seen", [DEFECT])
        first = runner.report()
        pending = runner.take_pending()
    finally:
        runner.close()
    assert (first["corrected_frames"], first["candidate_only_correct"], first["active_only_correct"]) == (1, 1, 0)
    following = ShadowRunner(FixedDetector([DEFECT]), 100, pending_truth=2)
    try:
        following.adopt_pending(pending)
        assert following.judge_late("f3", [])  # nothing there: both wrong, a tie
        second = following.report()
    finally:
        following.close()
    assert (second["corrected_frames"], second["candidate_only_correct"], second["active_only_correct"]) == (1, 0, 0)
    assert following.late_truths == 1


class _Collector:
    def submit_correction(self, image, frame_id, labels, detections, model_version):
        from edge_agent.collector import Decision, Outcome
        from protocol.messages import SampleReason

        return Decision(Outcome.MODEL_AGREED, SampleReason.CORRECTION)


def test_the_hmi_hands_the_operators_labels_on_as_the_frames_truth():
    from edge_agent.frame_buffer import FrameBuffer

    frames = FrameBuffer(4)
    frames.push("f1", np.zeros((100, 200, 3), np.uint8), [], 1, ("scratch",))
    seen = []
    api = CorrectionApi(_Collector(), frames, token=None, max_body_bytes=10_000,
                        on_truth=lambda frame_id, truths: seen.append((frame_id, truths)))
    body = b'{"frame_id": "f1", "labels": [{"cls": 0, "cx": 0.5, "cy": 0.5, "w": 0.1, "h": 0.2}]}'
    assert api.post_correction(body).status == 200
    ((frame_id, truths),) = seen
    assert frame_id == "f1" and len(truths) == 1
    box = truths[0]
    assert (box.cls, round(box.x1), round(box.y1), round(box.x2), round(box.y2)) == (0, 90, 40, 110, 60)
