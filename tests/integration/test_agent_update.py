"""The agent's updater against a real object store: download through a presigned URL, verify,
stage; untrusted signatures, tampered downloads and downgrades are refused with a reason."""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta

import httpx
import pytest

from edge_agent.ota.slots import ModelSlots
from edge_agent.ota.states import State
from edge_agent.ota.updater import Updater
from firmware_bundles import TrustStore, build_bundle, generate_private_key
from protocol.messages import DeployCommand, Hardware

pytestmark = pytest.mark.integration

CPU = Hardware(onnxruntime_providers=["CPUExecutionProvider"])



@pytest.fixture
def signer():
    return generate_private_key()


@pytest.fixture
def publish_bundle(s3_store, signer, tmp_path, tiny_onnx):
    def publish(version: int, key=None, tamper: bool = False) -> DeployCommand:
        out = tmp_path / f"bundle-{version}-{uuid.uuid4().hex[:6]}.tar"
        build_bundle(out, {"model.onnx": tiny_onnx("m.onnx")}, private_key=key or signer,
                     model_name="test", version=version, class_names=["a", "b", "c"], input_spec=32)
        data = out.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if tamper:  # what the store serves differs from what the command promised
            middle = len(data) // 2
            data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]
        object_key = f"bundles/{out.name}"
        s3_store.put_bytes(object_key, data)
        return DeployCommand(device_id="cam-ota", version=version, mode="direct", bundle_sha256=sha,
                             bundle_size=len(data), bundle_url=s3_store.presigned_get(object_key, timedelta(minutes=5)))

    return publish


@pytest.fixture
def updater(signer, tmp_path):
    events = []
    slots = ModelSlots(tmp_path / "agent" / "models")
    trust = TrustStore([signer.public_key()])
    u = Updater("cam-ota", tmp_path / "agent", slots, trust, httpx.Client(timeout=30), events.append,
                max_bundle_bytes=10 * 1024 * 1024, hardware=CPU, agent_version="0.1.0")
    u.events = events
    return u


def _install(updater: Updater, command: DeployCommand) -> State:
    assert updater.begin(command)
    updater.fetch()
    return updater.state


def test_good_bundle_is_downloaded_verified_and_staged(updater, publish_bundle):
    assert _install(updater, publish_bundle(1)) is State.STAGED
    assert updater.slots.candidate() == 1
    assert [e.to_state for e in updater.events] == ["DOWNLOADING", "VERIFYING", "STAGED"]
    assert updater.slots.model_path(1).exists()


def test_bundle_signed_by_an_untrusted_key_is_rejected(updater, publish_bundle):
    state = _install(updater, publish_bundle(1, key=generate_private_key()))
    assert state is State.REJECTED
    assert "key" in updater.record.reason.lower()
    assert updater.slots.candidate() is None and not updater.slots.has(1)


def test_download_that_does_not_match_the_command_fails(updater, publish_bundle):
    state = _install(updater, publish_bundle(1, tamper=True))
    assert state is State.FAILED
    assert "sha256" in updater.record.reason


def test_older_bundle_is_refused_by_rollback_protection(updater, publish_bundle):
    assert _install(updater, publish_bundle(3)) is State.STAGED
    updater.transition(updater_event("promote"))
    updater.switch()
    updater.commit("healthy")
    assert updater.slots.active() == 3
    state = _install(updater, publish_bundle(2))
    assert state is State.REJECTED
    assert "rollback protection" in updater.record.reason
    assert updater.slots.active() == 3


def test_redelivered_command_is_ignored(updater, publish_bundle):
    command = publish_bundle(1)
    assert _install(updater, command) is State.STAGED
    assert updater.begin(command) is False


def updater_event(name: str):
    from edge_agent.ota.states import Event

    return Event(name)


def test_an_update_that_keeps_crashing_the_agent_is_given_up(updater, publish_bundle, signer, tmp_path):
    assert updater.begin(publish_bundle(1))
    assert updater.state is State.DOWNLOADING  # the agent dies here, again and again
    for _ in range(4):
        restarted = Updater("cam-ota", tmp_path / "agent", updater.slots, TrustStore([signer.public_key()]),
                            httpx.Client(timeout=30), lambda event: None, max_bundle_bytes=10 * 1024 * 1024,
                            hardware=CPU, agent_version="0.1.0")
    assert restarted.state is State.DOWNLOADING
    assert restarted.resume_count_exceeded()
