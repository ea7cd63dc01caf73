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
