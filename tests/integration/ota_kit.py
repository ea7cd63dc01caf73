"""Shared by the OTA integration tests (a helper module, not a test file): tiny detector models
with a constant, chosen output, signed bundles of them in the object store, the real agent as a
subprocess, and the server's view of it over MQTT. Test modules import the fixtures they use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.inference import create_detector
from edge_agent.ota.record import load_record
from edge_agent.ota.slots import ModelSlots
from firmware_bundles import (
    TrustStore,
    build_bundle,
    generate_private_key,
    save_public_key,
    sha256_file,
    unpack_bundle,
)
from protocol import decode_message
from protocol.messages import DeployCommand, Heartbeat, StatusMessage, UpdateEvent
from server.mqtt_bus import MqttBus

ROOT = Path(__file__).resolve().parents[2]
WAIT = 120.0  # generous: only a hung agent ever gets near it
HEALTH = {"window_frames": 15, "min_baseline_frames": 10, "max_error_rate": 0.1}
BASELINE_FRAMES = 25

CLASS_NAMES = ["bolt", "nut", "washer"]
IMGSZ = 32


def detector_onnx(path: Path, score: float, *, anchors: int = 8) -> Path:
    """A YOLOv8-shaped detector ([1, 4+nc, anchors]) that always sees one box of class 0 at ``score``
    (0 = it never detects anything): enough to load, pass the agent's test inference, and be told
    apart by the health check."""
    head = np.zeros((1, 4 + len(CLASS_NAMES), anchors), np.float32)
    head[0, :4, :] = 1.0
    head[0, :4, 0] = [16.0, 16.0, 12.0, 12.0]
    head[0, 4, 0] = score
    nodes = [
        helper.make_node("Constant", [], ["head"], value=numpy_helper.from_array(head)),
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["head", "nothing"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "const-head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, IMGSZ, IMGSZ])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(head.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    names = "{" + ", ".join(f"{i}: '{n}'" for i, n in enumerate(CLASS_NAMES)) + "}"
    for key, value in {"names": names, "imgsz": f"[{IMGSZ}, {IMGSZ}]", "task": "detect"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def detector_bundle(out: Path, work: Path, version: int, key, *, score: float = 0.9, padding: int = 0,
                    **build_kwargs) -> Path:
    """A signed bundle of ``detector_onnx``; ``padding`` bytes of extra payload make it span
    several download chunks (to interrupt a download half-way)."""
    work.mkdir(parents=True, exist_ok=True)
    files = {"model.onnx": detector_onnx(work / f"model-{version}-{score}.onnx", score)}
    if padding:
        extra = work / f"padding-{padding}.bin"
        extra.write_bytes(np.random.default_rng(version).bytes(padding))
        files["padding.bin"] = extra
    build_bundle(out, files, private_key=key, model_name="detector", version=version,
                 class_names=CLASS_NAMES, input_spec=IMGSZ, **build_kwargs)
    return out


# ---------------------------------------------------------------- the real agent and the server's view of it


class Bundles:
    """Signed bundles in the object store: v1 and v2 (padded, so a download can be cut half-way),
    v2 that detects nothing (its health check must fail), v2 signed by an unknown key."""

    def __init__(self, store, work: Path) -> None:
        self.key = generate_private_key()
        self.keys_dir = work / "trusted"
        self.keys_dir.mkdir()
        save_public_key(self.key.public_key(), self.keys_dir / "signing.pub.pem")
        self.trust = TrustStore.from_path(self.keys_dir)
        self._store = store
        self.paths = {
            "v1": detector_bundle(work / "v1.tar", work / "build", 1, self.key, score=0.9),
            "v2": detector_bundle(work / "v2.tar", work / "build", 2, self.key, score=0.8, padding=300_000),
            "v2-blind": detector_bundle(work / "v2-blind.tar", work / "build", 2, self.key, score=0.0),
            "v2-untrusted": detector_bundle(work / "v2-untrusted.tar", work / "build", 2, generate_private_key()),
        }
        self.urls, self.object_keys = {}, {}
        for name, path in self.paths.items():
            key = f"ota-test/{uuid.uuid4().hex[:8]}/{name}.tar"
            store.put_file(key, path)
            self.object_keys[name] = key
            self.urls[name] = store.presigned_get(key, timedelta(hours=1))

    def deploy(self, device: str, name: str, *, mode: str = "shadow_then_switch") -> DeployCommand:
        """``name`` "missing": v2's command, but the URL names nothing in the store."""
        path = self.paths["v2" if name == "missing" else name]
        version = 1 if name == "v1" else 2
        url = self.urls["v2"].replace("/v2.tar", "/gone.tar") if name == "missing" else self.urls[name]
        return DeployCommand(device_id=device, version=version, bundle_url=url, bundle_sha256=sha256_file(path),
                             bundle_size=path.stat().st_size, mode=mode, shadow_frames=10)

    def seed(self, data_dir: Path, versions: dict[int, str], active: int) -> None:
        """Install slots the way the agent does (verified unpack), before the agent starts."""
        slots = ModelSlots(data_dir / "models")
        for version, name in versions.items():
            unpack_bundle(self.paths[name], slots.slot(version), self.trust)
        for version in sorted(versions):
            if version <= active:
                slots.set_active(version)


@pytest.fixture(scope="module")
def bundles(s3_store, tmp_path_factory) -> Bundles:
    return Bundles(s3_store, tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def frames() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="edgeloop-frames-"))
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(folder / f"frame-{i}.png"), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return folder


class Watch:
    """The server's view of one device: its update events, retained status and heartbeats."""

    def __init__(self, mqtt_broker, device: str) -> None:
        self.device = device
        self.updates: list[UpdateEvent] = []
        self.status: StatusMessage | None = None
        self.frames = 0
        self._lock = threading.Lock()
        self.bus = MqttBus(mqtt_broker.host, mqtt_broker.port, mqtt_broker.server_username,
                           mqtt_broker.server_password, f"crash-watch-{uuid.uuid4().hex[:8]}", self._on)
        self.bus.start()

    def _on(self, topic: str, payload: bytes) -> None:
        try:
            message = decode_message(topic, payload)
        except Exception:
            return
        if message.device_id != self.device:
            return
        with self._lock:
            if isinstance(message, UpdateEvent):
                self.updates.append(message)
            elif isinstance(message, StatusMessage):
                self.status = message
            elif isinstance(message, Heartbeat):
                self.frames = message.frames_total

    def send(self, command) -> None:
        self.bus.publish_command(self.device, command)


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class AgentProcess:
    def __init__(self, data_dir: Path, env: dict[str, str], log: Path) -> None:
        self.data_dir, self.env, self.log = data_dir, env, log
        self.proc: subprocess.Popen | None = None

    def start(self, crash_at: str | None = None) -> None:
        env = dict(self.env)
        if crash_at:
            env["EDGELOOP_AGENT_CRASH_AT"] = crash_at
        with self.log.open("ab") as out:
            out.write(f"\n===== start crash_at={crash_at}\n".encode())
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent"], cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    def wait_killed(self) -> None:
        try:
            code = self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"agent was not killed at its crash point; log:\n{self.tail()}") from None
        assert code == -signal.SIGKILL, f"agent exited with {code}, not SIGKILL; log:\n{self.tail()}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def record(self):
        return load_record(self.data_dir / "update.json")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def agent_device(mqtt_broker, device_credentials, frames, bundles, tmp_path):
    """(device_id, AgentProcess, Watch): a real agent's settings (not started yet) and the server's view."""
    device_id = f"ota-{uuid.uuid4().hex[:8]}"
    _, password = device_credentials(device_id)
    data_dir = tmp_path / "agent"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_AGENT_")}
    env.update({
        "EDGELOOP_AGENT_DEVICE_ID": device_id,
        "EDGELOOP_AGENT_MQTT_HOST": mqtt_broker.host,
        "EDGELOOP_AGENT_MQTT_PORT": str(mqtt_broker.port),
        "EDGELOOP_AGENT_MQTT_PASSWORD": password,
        "EDGELOOP_AGENT_API_URL": "http://127.0.0.1:9",  # no sample uploads in these runs
        "EDGELOOP_AGENT_DATA_DIR": str(data_dir),
        "EDGELOOP_AGENT_TRUSTED_KEYS": str(bundles.keys_dir),
        "EDGELOOP_AGENT_SOURCE": f"folder:{frames}",
        "EDGELOOP_AGENT_MAX_FPS": "40",
        "EDGELOOP_AGENT_HEARTBEAT_SECONDS": "0.5",
        "EDGELOOP_AGENT_HEALTH": json.dumps(HEALTH),
        "EDGELOOP_AGENT_DETECTOR": json.dumps({"type": "onnxruntime", "providers": ["CPUExecutionProvider"]}),
    })
    agent = AgentProcess(data_dir, env, tmp_path / "agent.log")
    watch = Watch(mqtt_broker, device_id)
    try:
        yield device_id, agent, watch
    finally:
        agent.stop()
        watch.bus.stop()


def assert_serving_a_verified_model(agent: AgentProcess, trust: TrustStore, expected: set[int]) -> int:
    """With the agent dead or alive: the active link names a slot that verifies and loads."""
    slots = ModelSlots(agent.data_dir / "models")
    version = slots.active()
    assert version in expected, f"active slot is {version}, expected one of {expected}"
    slots.verify(version, trust)
    detector = create_detector(slots.model_path(version), {"type": "onnxruntime",
                                                           "providers": ["CPUExecutionProvider"]})
    detector.load()
    detector.health_check()
    detector.close()
    return version


def log_entries(agent: AgentProcess) -> list[dict]:
    """The agent's structured log lines (JSON when not on a terminal)."""
    entries = []
    for line in agent.log.read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries
