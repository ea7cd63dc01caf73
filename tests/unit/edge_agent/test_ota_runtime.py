"""The agent's frame loop with the update machine, offline (no broker reachable: events queue) and
with a fake detector backend: a model that fails on real frames is rolled back by the health
check without stopping the loop; a slot damaged on disk is never served."""

from __future__ import annotations

import threading
import time
from typing import Literal

import cv2
import numpy as np
import pytest

from edge_agent.inference.backends.base import Detector, DetectorSettings, register_backend
from edge_agent.ota.health import HealthBaseline
from edge_agent.ota.record import UpdateRecord, load_record, save_record
from edge_agent.ota.slots import ModelSlots
from edge_agent.ota.states import State
from edge_agent.runtime import Agent
from edge_agent.settings import AgentSettings
from firmware_bundles import TrustStore, build_bundle, generate_private_key, save_public_key, unpack_bundle
from protocol.messages import PromoteCommand, ShadowReport


class FakeSettings(DetectorSettings):
    type: Literal["ota-test-fake"] = "ota-test-fake"


@register_backend("ota-test-fake")
class FakeDetector(Detector):
    """Behaviour from the model file: ``ok`` always finds one box at 0.9; ``fails-on-frames`` passes
    load and the blank-frame test inference, then raises on every real frame."""

    settings_cls = FakeSettings

    def load(self) -> None:
        self.behaviour = self.model_path.read_bytes().split(b":")[0].decode()
        self._class_names, self._imgsz = ("part",), (32, 32)

    @property
    def loaded(self) -> bool:
        return self._class_names is not None

    def _forward(self, tensor: np.ndarray) -> np.ndarray:
        if self.behaviour == "fails-on-frames" and tensor.max() != tensor.min():  # the blank test frame is uniform
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        head = np.zeros((1, 5, 4), np.float32)
        head[0, :4, 0] = [16, 16, 8, 8]
        head[0, 4, 0] = 0.9
        return head

    def close(self) -> None:
        self._class_names = None


@pytest.fixture
def setup(tmp_path):
    key = generate_private_key()
    save_public_key(key.public_key(), tmp_path / "signing.pub.pem")
    trust = TrustStore.from_path(tmp_path / "signing.pub.pem")
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        cv2.imwrite(str(frames / f"{i}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    data = tmp_path / "agent"
    slots = ModelSlots(data / "models")
    for version, behaviour in ((1, "ok"), (2, "fails-on-frames")):
        model = tmp_path / f"model-{version}.onnx"
        model.write_bytes(f"{behaviour}:{version}".encode())
        build_bundle(tmp_path / f"b{version}.tar", {"model.onnx": model}, private_key=key, model_name="fake",
                     version=version, class_names=["part"], input_spec=32)
        unpack_bundle(tmp_path / f"b{version}.tar", slots.slot(version), trust)
    slots.set_active(1)
    settings = AgentSettings(
        device_id="cam-rt", data_dir=data, trusted_keys=tmp_path / "signing.pub.pem", source=f"folder:{frames}",
        mqtt_host="127.0.0.1", mqtt_port=9, api_url="http://127.0.0.1:9", detector={"type": "ota-test-fake"},
        max_fps=200, heartbeat_seconds=60, health={"window_frames": 10, "min_baseline_frames": 5})
    return settings, slots, trust


def _persist(settings: AgentSettings, state: State) -> None:
    """The agent died right after persisting ``state`` of a direct update 1 → 2."""
    save_record(settings.data_dir / "update.json", UpdateRecord(
        update_id="u-2", version=2, state=state, mode="direct", from_version=1, entries={state.value: 1},
        baseline=HealthBaseline(version=1, frames=50, detection_rate=1.0, mean_top_confidence=0.9)))


def _run_until(settings: AgentSettings, done, timeout: float = 60.0) -> Agent:
    agent = Agent(settings)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not done(agent) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        agent.stop()
        thread.join(20)
    assert not thread.is_alive()
    return agent


def _rolled_back(agent: Agent) -> bool:
    return agent.updater.state is State.ROLLED_BACK


def test_a_model_failing_on_real_frames_is_rolled_back_by_the_health_check(setup) -> None:
    settings, slots, trust = setup
    _persist(settings, State.PROMOTING)
    agent = _run_until(settings, _rolled_back)
    record = load_record(settings.data_dir / "update.json")
    assert record.state is State.ROLLED_BACK, record
    assert "version 2 failed 2 of its first 2 frames (at most 1 of 10 allowed)" in record.reason
    assert agent.inference_errors >= 2
    assert agent.frames > agent.inference_errors  # the loop kept serving, on version 1 again
    assert slots.active() == 1 and not slots.has(2)
    assert agent.active_version == 1
    slots.verify(1, trust)


def test_a_slot_damaged_on_disk_is_never_served(setup) -> None:
    settings, slots, _ = setup
    slots.set_active(2)  # the switch had happened; then the new slot was damaged on disk
    (slots.slot(2) / "model.onnx").write_bytes(b"ok:but not what was signed")
    _persist(settings, State.CHECKING)
    served = []

    def done(agent: Agent) -> bool:
        served.append(agent.active_version)
        return _rolled_back(agent)

    _run_until(settings, done)
    record = load_record(settings.data_dir / "update.json")
    assert record.state is State.ROLLED_BACK
    assert "version 2 failed to load: slot 2: model.onnx differs from its signed manifest" in record.reason
    assert 2 not in served and slots.active() == 1



def test_the_loop_publishes_drift_windows_and_takes_hmi_corrections(setup, tmp_path) -> None:
    """Wiring of the loop's side paths: drift windows per model with QA's correction rate, and a
    line HMI correcting a served frame by id through the agent's local endpoint."""
    import socket

    import httpx

    from protocol.messages import DriftReport

    settings, _, _ = setup
    frames = tmp_path / "frames"
    (frames / "0.txt").write_text("0 0.1 0.1 0.05 0.05\n")  # QA disagrees with the fake model's box
    (frames / "1.txt").write_text("0 0.5 0.5 0.25 0.25\n")  # ...and agrees with it here
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = settings.model_copy(update={
        "drift": settings.drift.model_copy(update={"window_frames": 6, "min_frames": 1, "window_seconds": 0}),
        "hmi_port": port})
    agent = Agent(settings)
    published = []
    agent.mqtt.publish = lambda message: published.append(message)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len([m for m in published if isinstance(m, DriftReport)]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        correction = httpx.post(f"http://127.0.0.1:{port}/v1/corrections", json={
            "frame_id": "2", "labels": [{"cls": 0, "cx": 0.2, "cy": 0.2, "w": 0.1, "h": 0.1}]})
        unknown = httpx.post(f"http://127.0.0.1:{port}/v1/corrections", json={
            "frame_id": "no-such-frame", "labels": []})
    finally:
        agent.stop()
        thread.join(20)
    drift = [m for m in published if isinstance(m, DriftReport)]
    assert len(drift) >= 2 and (drift[0].window, drift[1].window) == (0, 1)
    assert drift[0].frames == 6 and drift[0].model_version == 1
    assert drift[0].qa_frames == 4 and drift[0].correction_rate == 0.5  # frames 0 and 1, twice each in 6
    assert "brightness" in drift[0].histograms
    assert correction.status_code == 202, correction.text
    assert unknown.status_code == 404
    # Frame 0's folder label (QA disagreed) once, and the HMI's correction of frame 2.
    assert agent.collector.counters()["collected"]["correction"] == 2


def test_a_rollout_deploy_holds_in_shadow_reporting_windows_until_the_server_promotes(tmp_path) -> None:
    key = generate_private_key()
    save_public_key(key.public_key(), tmp_path / "signing.pub.pem")
    trust = TrustStore.from_path(tmp_path / "signing.pub.pem")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    data = tmp_path / "agent"
    slots = ModelSlots(data / "models")
    for version in (1, 2):
        model = tmp_path / f"model-{version}.onnx"
        model.write_bytes(f"ok:{version}".encode())
        build_bundle(tmp_path / f"b{version}.tar", {"model.onnx": model}, private_key=key, model_name="fake",
                     version=version, class_names=["part"], input_spec=32)
        unpack_bundle(tmp_path / f"b{version}.tar", slots.slot(version), trust)
    slots.set_active(1)
    slots.set_candidate(2)
    save_record(data / "update.json", UpdateRecord(
        update_id="u-2", version=2, state=State.STAGED, mode="shadow_then_switch", shadow_frames=5,
        await_promotion=True, from_version=1, entries={"STAGED": 1}))
    settings = AgentSettings(
        device_id="cam-hold", data_dir=data, trusted_keys=tmp_path / "signing.pub.pem", source=f"folder:{frames}",
        mqtt_host="127.0.0.1", mqtt_port=9, api_url="http://127.0.0.1:9", detector={"type": "ota-test-fake"},
        max_fps=200, heartbeat_seconds=60, health={"window_frames": 10, "min_baseline_frames": 5},
        shadow_max_busy_fraction=1.0)
    agent = Agent(settings)
    reports: list[ShadowReport] = []
    publish = agent.mqtt.publish

    def record(message) -> None:
        if isinstance(message, ShadowReport):
            reports.append(message)
        publish(message)

    agent.mqtt.publish = record
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()

    def wait(what: str, condition) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    try:
        wait("three shadow windows", lambda: len(reports) >= 3)
        assert agent.updater.state is State.SHADOWING and agent.active_version == 1
        assert [r.window for r in reports[:3]] == [0, 1, 2]
        assert all(r.update_id == "u-2" and r.frames_compared >= 5 for r in reports)
        agent.mqtt.commands.put(PromoteCommand(device_id="cam-hold", version=3))  # not what it shadows
        held = len(reports)
        wait("another window", lambda: len(reports) > held + 1)
        assert agent.updater.state is State.SHADOWING
        agent.mqtt.commands.put(PromoteCommand(device_id="cam-hold", version=2))
        wait("the switch to version 2", lambda: agent.updater.state is State.ACTIVE)
        assert agent.active_version == 2 and slots.active() == 2
    finally:
        agent.stop()
        thread.join(20)
