"""The line HMI correction endpoint, over real HTTP on an ephemeral loopback port, into a real spool."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from edge_agent.collector import ReasonLimits, SampleCollector
from edge_agent.dedup import NearDuplicateIndex
from edge_agent.frame_buffer import FrameBuffer
from edge_agent.hmi import CorrectionApi, CorrectionServer
from edge_agent.inference.types import Detection
from edge_agent.settings import AgentSettings
from edge_agent.spool import Spool
from protocol.messages import Box, SampleReason

W, H = 160, 120
TOKEN = "line-7-secret"
NAMES = ("scratch", "dent", "stain")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The model saw a dent (class 1) in the middle of every buffered frame.
PRED = Detection(1, 0.83, 60, 45, 100, 75)
SAME_AS_PRED = {"cls": 1, "cx": 0.5, "cy": 0.5, "w": 0.25, "h": 0.25}
A_SCRATCH = {"cls": 0, "cx": 0.5, "cy": 0.5, "w": 0.25, "h": 0.25}
MAX_BODY = 4096


def scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.uint8)
    img[:] = rng.integers(40, 200, 3)
    for _ in range(6):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x1, y1 = int(rng.integers(0, W - 20)), int(rng.integers(0, H - 20))
        cv2.rectangle(img, (x1, y1), (x1 + int(rng.integers(15, W // 2)), y1 + int(rng.integers(15, H // 2))),
                      color, -1)
    return img


def noisy(img: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.int16) + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


class Agent:
    """What runtime.py wires together: a spool, a collector, a frame buffer and the server."""

    def __init__(self, root: Path, *, token: str | None = TOKEN, corrections: bool = True,
                 limits: dict | None = None, buffer_frames: int = 8) -> None:
        self.verdicts: list[bool] = []
        self.spool = Spool(root / "spool", max_bytes=50_000_000)
        self.collector = SampleCollector(
            self.spool, corrections=corrections, low_confidence=False, low_band=(0.3, 0.6), random_rate=0.0,
            max_per_hour=1000, jpeg_quality=90, rng=random.Random(0), limits=limits,
            quota_path=root / "quota.json", dedup=NearDuplicateIndex(24, 64))
        self.frames = FrameBuffer(buffer_frames)
        api = CorrectionApi(self.collector, self.frames, token=token, max_body_bytes=MAX_BODY,
                            on_verdict=self.verdicts.append)
        self.server = CorrectionServer(api, "127.0.0.1", 0).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=10)

    def push(self, frame_id: str, seed: int, version: int = 4) -> np.ndarray:
        img = scene(seed)
        self.frames.push(frame_id, img, [PRED], version, NAMES)
        return img

    def correct(self, frame_id: str, labels: list[dict], headers=AUTH, **extra) -> httpx.Response:
        return self.http.post("/v1/corrections", json={"frame_id": frame_id, "labels": labels, **extra},
                              headers=headers)

    def close(self) -> None:
        self.http.close()
        self.server.stop()
        self.spool.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    yield a
    a.close()


# --- the happy path and its variants ------------------------------------------------------------------


def test_correction_becomes_a_correction_sample_in_the_spool(agent: Agent) -> None:
    img = agent.push("cam1-000042", seed=1)
    r = agent.correct("cam1-000042", [A_SCRATCH, {"cls": 2, "cx": 0.1, "cy": 0.2, "w": 0.05, "h": 0.1}],
                      operator="anna")
    assert r.status_code == 202, r.text
    sample_id = r.json()["sample_id"]
    assert r.json()["status"] == "collected" and len(sample_id) == 32
    assert agent.spool.depth() == 1
    item = agent.spool.next_due()
    assert item.sample_id == sample_id and item.content_type == "image/jpeg"
    meta = item.meta
    assert meta["reason"] == SampleReason.CORRECTION.value
    assert meta["frame_id"] == "cam1-000042" and meta["model_version"] == 4
    assert [Box.model_validate(b) for b in meta["labels"]] == [
        Box(cls=0, cx=0.5, cy=0.5, w=0.25, h=0.25), Box(cls=2, cx=0.1, cy=0.2, w=0.05, h=0.1)]
    (pred,) = meta["predictions"]
    assert Box.model_validate(pred) == Box(cls=1, cx=0.5, cy=0.5, w=0.25, h=0.25, conf=0.83)
    stored = cv2.imdecode(np.frombuffer(item.path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert stored.shape == img.shape and np.abs(stored.astype(int) - img).mean() < 3  # the buffered pixels


def test_correction_that_agrees_with_the_model_is_not_kept(agent: Agent) -> None:
    agent.push("f1", seed=1)
    r = agent.correct("f1", [SAME_AS_PRED])
    assert r.status_code == 200 and r.json() == {"status": "model_agreed"}
    assert agent.spool.depth() == 0


def test_each_judged_frame_reports_qa_verdict_for_the_drift_window(agent: Agent) -> None:
    agent.push("f1", seed=1)
    agent.push("f2", seed=2)
    assert agent.correct("f1", [SAME_AS_PRED]).status_code == 200
    assert agent.correct("f2", [A_SCRATCH]).status_code == 202
    assert agent.correct("no-such-frame", [A_SCRATCH]).status_code == 404
    assert agent.verdicts == [False, True]  # agreed, corrected; an unknown frame was not judged


def test_empty_labels_say_the_model_saw_something_that_is_not_there(agent: Agent) -> None:
    agent.push("f1", seed=1)
    r = agent.correct("f1", [])
    assert r.status_code == 202
    assert agent.spool.next_due().meta["labels"] == []


def test_a_retried_post_returns_the_same_sample(agent: Agent) -> None:
    agent.push("f1", seed=1)
    first = agent.correct("f1", [A_SCRATCH])
    again = agent.correct("f1", [A_SCRATCH])
    assert first.status_code == 202
    assert again.status_code == 200 and again.json() == {"status": "already_collected",
                                                         "sample_id": first.json()["sample_id"]}
    assert agent.spool.depth() == 1


def test_a_second_correction_of_the_same_scene_is_a_near_duplicate(agent: Agent) -> None:
    base = scene(5)
    agent.frames.push("f1", base, [PRED], 4, NAMES)
    agent.frames.push("f2", noisy(base, 1), [PRED], 4, NAMES)  # the line stood still
    agent.push("f3", seed=6)
    assert agent.correct("f1", [A_SCRATCH]).status_code == 202
    r = agent.correct("f2", [A_SCRATCH])
    assert r.status_code == 200 and r.json() == {"status": "near_duplicate"}
    assert agent.correct("f3", [A_SCRATCH]).status_code == 202
    assert agent.collector.counters()["near_duplicates"]["correction"] == 1


# --- reading endpoints ----------------------------------------------------------------------------------


def test_health_needs_no_token(agent: Agent) -> None:
    agent.push("f1", seed=1)
    r = agent.http.get("/v1/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "frames_buffered": 1}


def test_recent_frames_are_listed_newest_first_with_predictions(agent: Agent) -> None:
    for i in range(10):  # the buffer holds 8
        agent.push(f"f{i}", seed=i, version=3 + i % 2)
    r = agent.http.get("/v1/frames/recent", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert [f["frame_id"] for f in body["frames"]] == [f"f{i}" for i in range(9, 1, -1)]
    assert body["max_frames"] == 8
    newest = body["frames"][0]
    assert newest["model_version"] == 4 and (newest["width"], newest["height"]) == (W, H)
    assert newest["predictions"] == [Box(cls=1, cx=0.5, cy=0.5, w=0.25, h=0.25, conf=0.83).model_dump()]
    assert newest["age_s"] >= 0


# --- every refusal --------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_401_without_the_right_bearer_token(agent: Agent, headers: dict) -> None:
    agent.push("f1", seed=1)
    r = agent.correct("f1", [A_SCRATCH], headers=headers)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert agent.http.get("/v1/frames/recent", headers=headers).status_code == 401
    assert agent.spool.depth() == 0
    # The refused body was read off the connection: the next request on it works.
    assert agent.correct("f1", [A_SCRATCH]).status_code == 202


def test_no_token_configured_means_no_check_on_loopback(tmp_path: Path) -> None:
    a = Agent(tmp_path, token=None)
    try:
        a.push("f1", seed=1)
        assert a.correct("f1", [A_SCRATCH], headers={}).status_code == 202
    finally:
        a.close()


def test_404_for_an_unknown_or_expired_frame(agent: Agent) -> None:
    r = agent.correct("never-seen", [A_SCRATCH])
    assert r.status_code == 404 and r.json()["error"] == "frame_not_found"
    assert "never-seen" in r.json()["detail"]
    agent.push("old", seed=1)
    for i in range(8):  # pushes "old" out of the 8-frame buffer
        agent.push(f"new{i}", seed=10 + i)
    r = agent.correct("old", [A_SCRATCH])
    assert r.status_code == 404 and "expired" in r.json()["detail"]
    assert agent.spool.depth() == 0


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00", b""])
def test_400_for_a_body_that_is_not_json(agent: Agent, body: bytes) -> None:
    r = agent.http.post("/v1/corrections", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"


@pytest.mark.parametrize("payload", [
    [],  # not an object
    {"labels": [A_SCRATCH]},  # no frame id
    {"frame_id": "f1"},  # no labels
    {"frame_id": "", "labels": []},
    {"frame_id": "f1", "labels": [{**A_SCRATCH, "cx": 0.0}]},  # coordinates are in (0, 1]
    {"frame_id": "f1", "labels": [{**A_SCRATCH, "w": 1.5}]},
    {"frame_id": "f1", "labels": [{**A_SCRATCH, "h": float("nan")}]},
    {"frame_id": "f1", "labels": [{**A_SCRATCH, "cls": -1}]},
    {"frame_id": "f1", "labels": [{**A_SCRATCH, "cls": 1.5}]},
    {"frame_id": "f1", "labels": [{**A_SCRATCH, "cls": "1"}]},
    {"frame_id": "f1", "labels": [{"cls": 0, "cx": 0.5, "cy": 0.5, "w": 0.1}]},  # no h
    {"frame_id": "f1", "labels": [{**A_SCRATCH, "angle": 3}]},  # unknown field
    {"frame_id": "f1", "labels": [], "shift": "night"},
    {"frame_id": "f1", "labels": [A_SCRATCH], "operator": "x" * 200},
])
def test_422_for_a_malformed_correction(agent: Agent, payload) -> None:
    agent.push("f1", seed=1)
    r = agent.http.post("/v1/corrections", content=json.dumps(payload), headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_correction" and r.json()["detail"]
    assert agent.spool.depth() == 0


def test_422_for_a_class_the_model_does_not_have(agent: Agent) -> None:
    agent.push("f1", seed=1)
    r = agent.correct("f1", [A_SCRATCH, {**A_SCRATCH, "cls": 3}, {**A_SCRATCH, "cls": 7}])
    assert r.status_code == 422 and r.json()["error"] == "unknown_class"
    assert "[3, 7]" in r.json()["detail"] and "0..2" in r.json()["detail"]
    assert agent.spool.depth() == 0


def test_413_for_a_body_over_the_limit(agent: Agent) -> None:
    agent.push("f1", seed=1)
    big = {"frame_id": "f1", "labels": [A_SCRATCH], "operator": "x" * MAX_BODY}
    r = agent.http.post("/v1/corrections", content=json.dumps(big), headers=AUTH)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    assert agent.spool.depth() == 0
    assert agent.correct("f1", [A_SCRATCH]).status_code == 202  # the client reconnects and goes on


def test_411_without_a_content_length(agent: Agent) -> None:
    agent.push("f1", seed=1)
    chunks = iter([json.dumps({"frame_id": "f1", "labels": [A_SCRATCH]}).encode()])
    r = agent.http.post("/v1/corrections", content=chunks, headers=AUTH)  # chunked transfer encoding
    assert r.status_code == 411
    assert agent.spool.depth() == 0


def test_429_when_the_daily_quota_is_used_up(tmp_path: Path) -> None:
    a = Agent(tmp_path, limits={SampleReason.CORRECTION: ReasonLimits(100, 1)})
    try:
        a.push("f1", seed=1)
        a.push("f2", seed=2)
        assert a.correct("f1", [A_SCRATCH]).status_code == 202
        r = a.correct("f2", [A_SCRATCH])
        assert r.status_code == 429 and r.json()["error"] == "quota_exhausted"
        assert 0 < int(r.headers["Retry-After"]) <= 86_400
        assert r.json()["retry_after_s"] == int(r.headers["Retry-After"])
    finally:
        a.close()
    # The quota is on disk: a restarted agent still refuses today.
    b = Agent(tmp_path, limits={SampleReason.CORRECTION: ReasonLimits(100, 1)})
    try:
        b.push("f3", seed=3)
        assert b.correct("f3", [A_SCRATCH]).status_code == 429
    finally:
        b.close()


def test_429_when_the_hourly_rate_limit_is_reached(tmp_path: Path) -> None:
    a = Agent(tmp_path, limits={SampleReason.CORRECTION: ReasonLimits(2, 100)})
    try:
        for i in range(3):
            a.push(f"f{i}", seed=i)
        assert [a.correct(f"f{i}", [A_SCRATCH]).status_code for i in range(3)] == [202, 202, 429]
        r = a.correct("f2", [A_SCRATCH])
        assert r.json()["error"] == "rate_limited" and 3500 <= int(r.headers["Retry-After"]) <= 3600
    finally:
        a.close()


def test_403_when_corrections_are_switched_off(tmp_path: Path) -> None:
    a = Agent(tmp_path, corrections=False)
    try:
        a.push("f1", seed=1)
        r = a.correct("f1", [A_SCRATCH])
        assert r.status_code == 403 and r.json()["error"] == "corrections_disabled"
    finally:
        a.close()


def test_unknown_path_and_wrong_method(agent: Agent) -> None:
    assert agent.http.get("/v1/nothing", headers=AUTH).status_code == 404
    r = agent.http.get("/v1/corrections", headers=AUTH)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = agent.http.post("/v1/health", json={"a": 1})
    assert r.status_code == 405 and r.headers["Allow"] == "GET"
    assert agent.http.delete("/v1/corrections", headers=AUTH).status_code == 405
    assert agent.http.get("/v1/health").status_code == 200  # the connection is still usable


# --- the server's life ----------------------------------------------------------------------------------


def test_binding_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    try:
        collector = SampleCollector(spool, corrections=True, low_confidence=False, low_band=(0.3, 0.6),
                                    random_rate=0.0, max_per_hour=10, jpeg_quality=90)
        api = CorrectionApi(collector, FrameBuffer(4), token=None, max_body_bytes=MAX_BODY)
        with pytest.raises(ValueError, match="token"):
            CorrectionServer(api, "0.0.0.0", 0)
    finally:
        spool.close()


def test_from_settings_and_stop_release_the_port(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    settings = AgentSettings(device_id="cam-1", hmi_port=0, hmi_token="t0k", hmi_max_body_bytes=2048)
    collector = SampleCollector.from_settings(spool, settings, tmp_path / "quota.json")
    server = CorrectionServer.from_settings(settings, collector, FrameBuffer(4)).start()
    try:
        assert server.api.token == "t0k" and server.api.max_body_bytes == 2048
        assert httpx.get(f"{server.url}/v1/frames/recent", headers={"Authorization": "Bearer t0k"}).status_code == 200
    finally:
        server.stop()
        spool.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/v1/health", timeout=2)
