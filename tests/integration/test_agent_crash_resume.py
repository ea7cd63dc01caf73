"""The real agent (``python -m edge_agent``, a subprocess) against a real Mosquitto and SeaweedFS,
SIGKILLed at every persisted state of the update machine, as Mender's state tests do.

Each case starts the agent with the test-only ``EDGELOOP_AGENT_CRASH_AT=<point>`` hook
(edge_agent/ota/crashpoint.py), sends a real MQTT command, and expects the process to die by
SIGKILL right after that state was persisted. Then, with the process dead, the active slot must
verify against its signed manifest and load; the agent is restarted without the hook and must
resume to the right end state, report the restart on the ``update`` topic, serve a verified
model, and publish it in its retained status. One more case keeps the hook armed across restarts
and checks that the loop cap gives the update up and rolls back.
"""

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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
from ota_kit import detector_bundle

from edge_agent.inference import create_detector
from edge_agent.ota.record import load_record
from edge_agent.ota.slots import ModelSlots
from edge_agent.ota.states import RESTING, State
from firmware_bundles import TrustStore, generate_private_key, save_public_key, sha256_file, unpack_bundle
from firmware_bundles.commands import sign_command
from protocol import decode_message
from protocol.messages import DeployCommand, Heartbeat, RollbackCommand, StatusMessage, UpdateEvent
from server.mqtt_bus import MqttBus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WAIT = 120.0  # generous: only a hung agent ever gets near it
HEALTH = {"window_frames": 15, "min_baseline_frames": 10, "max_error_rate": 0.1}
BASELINE_FRAMES = 25


@dataclass(frozen=True)
class Case:
    crash_at: str
    action: str  # deploy | collapse | untrusted | missing | rollback
    end_state: State
    end_active: int


CASES = [
    *(Case(point, "deploy", State.ACTIVE, 2) for point in (
        "DOWNLOADING", "DOWNLOADING+partial", "VERIFYING", "STAGED", "SHADOWING", "PROMOTING",
        "PROMOTING+switched", "CHECKING", "ACTIVE")),
    Case("REJECTED", "untrusted", State.REJECTED, 1),
    Case("FAILED", "missing", State.FAILED, 1),
    Case("ROLLING_BACK", "collapse", State.ROLLED_BACK, 1),
    Case("ROLLING_BACK+switched", "collapse", State.ROLLED_BACK, 1),
    Case("ROLLED_BACK", "collapse", State.ROLLED_BACK, 1),
    Case("ROLLING_BACK", "rollback", State.ROLLED_BACK, 1),
]


def test_every_persisted_state_has_a_crash_case() -> None:
    # IDLE is only ever the fresh record, never persisted by a transition.
    assert {s.value for s in State} - {State.IDLE.value} <= {c.crash_at for c in CASES}


# ---------------------------------------------------------------- fixtures


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
        self.urls = {}
        for name, path in self.paths.items():
            key = f"crash-test/{uuid.uuid4().hex[:8]}/{name}.tar"
            store.put_file(key, path)
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
def device(mqtt_broker, device_credentials, frames, bundles, tmp_path):
    device_id = f"crash-{uuid.uuid4().hex[:8]}"
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


def _log_entries(agent: AgentProcess) -> list[dict]:
    """The agent's structured log lines (JSON when not on a terminal)."""
    entries = []
    for line in agent.log.read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def _command(case: Case, bundles: Bundles, device: str):
    if case.action == "deploy":
        return bundles.deploy(device, "v2")
    if case.action == "collapse":
        return bundles.deploy(device, "v2-blind", mode="direct")
    if case.action == "untrusted":
        return bundles.deploy(device, "v2-untrusted")
    if case.action == "missing":
        return bundles.deploy(device, "missing")
    command = RollbackCommand(device_id=device, to_version=1, reason="wave failed its gates",
                              expires_at=datetime.now(UTC) + timedelta(hours=1))
    return sign_command(command, bundles.key)


# ---------------------------------------------------------------- the crash matrix


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.action}-{c.crash_at}")
def test_sigkill_at_each_state_resumes_to_the_right_end_serving_a_verified_model(case, bundles, device) -> None:
    device_id, agent, watch = device
    if case.action == "rollback":
        bundles.seed(agent.data_dir, {1: "v1", 2: "v2"}, active=2)
    else:
        bundles.seed(agent.data_dir, {1: "v1"}, active=1)

    agent.start(crash_at=case.crash_at)
    wait_for(lambda: watch.status and watch.status.state == "online", "the agent's online status")
    if case.action == "collapse":  # judged against what the replaced model did
        wait_for(lambda: watch.frames >= BASELINE_FRAMES, "frames served by the active model (the baseline)")
    command = _command(case, bundles, device_id)
    watch.send(command)

    agent.wait_killed()
    state_at_kill = case.crash_at.split("+")[0]
    assert agent.record().state.value == state_at_kill
    assert agent.record().update_id == command.command_id
    assert_serving_a_verified_model(agent, bundles.trust, {1, 2})

    agent.start()
    wait_for(lambda: agent.record().state is case.end_state, f"{case.end_state} after the restart")
    wait_for(lambda: watch.status and watch.status.active_version == case.end_active and
             watch.status.state == "online", f"retained status with active version {case.end_active}")
    assert agent.alive(), agent.tail()
    assert assert_serving_a_verified_model(agent, bundles.trust, {case.end_active}) == case.end_active

    record = agent.record()
    ours = [e for e in watch.updates if e.update_id == command.command_id]
    resumes = [e for e in ours if e.event == "resume"]
    assert resumes and resumes[0].from_state == state_at_kill, [(e.event, e.to_state) for e in ours]
    wait_for(lambda: any(e.to_state == case.end_state.value and e.event != "resume" for e in watch.updates
                         if e.update_id == command.command_id) or state_at_kill == case.end_state.value,
             "the final transition on the update topic")
    assert all(e.reason for e in ours), "every transition is reported with a reason"
    if case.crash_at == "DOWNLOADING+partial":  # the second start asked only for the missing bytes
        offsets = [entry["resume_from"] for entry in _log_entries(agent) if entry.get("event") == "ota.download"]
        assert len(offsets) == 2 and offsets[0] == 0, offsets
        assert 0 < offsets[1] < command.bundle_size
    if case.end_state is State.ACTIVE:
        assert record.entries.get(State.ACTIVE.value) == 1
        assert ModelSlots(agent.data_dir / "models").has(1), "the replaced version stays for instant rollback"
    if case.action == "collapse":
        assert "detection rate collapsed" in record.reason and not ModelSlots(agent.data_dir / "models").has(2)
    if case.action == "untrusted":
        assert "not trusted" in record.reason
    if case.action == "missing":
        assert "bundle download failed: HTTP 4" in record.reason
    assert record.state in RESTING


def test_an_update_that_kills_the_agent_every_time_is_given_up_and_rolled_back(bundles, device) -> None:
    device_id, agent, watch = device
    bundles.seed(agent.data_dir, {1: "v1"}, active=1)
    agent.start(crash_at="CHECKING")
    wait_for(lambda: watch.status and watch.status.state == "online", "the agent's online status")
    wait_for(lambda: watch.frames >= BASELINE_FRAMES, "frames served by the active model")
    command = bundles.deploy(device_id, "v2", mode="direct")
    watch.send(command)
    agent.wait_killed()

    deaths = 1
    while True:  # the hook stays armed: the new model "kills" the agent on every start
        agent.start(crash_at="CHECKING")
        wait_for(lambda: not agent.alive() or agent.record().state is not State.CHECKING,
                 "the agent to die again or to give the update up")
        if agent.alive():
            break
        assert agent.proc.wait() == -signal.SIGKILL, agent.tail()
        deaths += 1
        assert_serving_a_verified_model(agent, bundles.trust, {1, 2})
        assert deaths < 10, "the resume loop is not capped"

    assert deaths == 3  # entered CHECKING once, resumed into it twice more; the fourth start gives up
    wait_for(lambda: agent.record().state is State.ROLLED_BACK, "the give-up rollback")
    record = agent.record()
    assert "version 2 kept stopping the agent (gave up after repeated interruptions in CHECKING)" in record.reason
    assert assert_serving_a_verified_model(agent, bundles.trust, {1}) == 1
    wait_for(lambda: watch.status and watch.status.active_version == 1, "status back on version 1")
