"""OTA updates against a real object store and broker.

The updater alone: download through a presigned URL, verify, stage; untrusted signatures,
tampered downloads and downgrades refused with a reason; the tampered-bundle matrix (each case
refused at VERIFYING with its own reason, the active slot untouched). The real agent (a
subprocess): signed rollbacks sent by the server switch between frames without a restart, forged
ones are refused and reported, and an unhealthy switch rolls itself back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import sessionmaker

from edge_agent.ota.compat import DeviceProfile
from edge_agent.ota.slots import ModelSlots
from edge_agent.ota.states import Event, State
from edge_agent.ota.updater import Updater
from firmware_bundles import (
    BundleManifest,
    HardwareTarget,
    RuntimeEntry,
    TrustStore,
    build_bundle,
    generate_private_key,
    key_id,
)
from firmware_bundles.archive import write_archive
from firmware_bundles.commands import sign_command
from protocol.messages import DeployCommand, Hardware, RollbackCommand
from server.db.models import Base, Deployment, Device, ModelVersion
from server.db.session import make_engine
from server.deploy import rollback_version

pytest.register_assert_rewrite("ota_kit")
from ota_kit import BASELINE_FRAMES, Bundles, assert_serving_a_verified_model, wait_for  # noqa: E402

pytestmark = pytest.mark.integration
pytest_plugins = ["ota_kit"]  # fixtures: bundles, frames, agent_device

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
                max_bundle_bytes=10 * 1024 * 1024, device=DeviceProfile(CPU, "0.1.0"))
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
                            device=DeviceProfile(CPU, "0.1.0"))
    assert restarted.state is State.DOWNLOADING
    assert restarted.resume_count_exceeded()


# ---------------------------------------------------------------- tampered bundles


def _rebuild(data: bytes, *, extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> bytes:
    """The same archive, member by member, with hostile members appended."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as old, tarfile.open(fileobj=out, mode="w",
                                                                      format=tarfile.PAX_FORMAT) as new:
        for info in old.getmembers():
            new.addfile(info, old.extractfile(info))
        for info, payload in extra:
            new.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out.getvalue()


def _member(data: bytes, name: str) -> tarfile.TarInfo:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmember(name)


def flip_model_byte(data: bytes, **_) -> bytes:
    info = _member(data, "files/model.onnx")
    at = info.offset_data + info.size // 2
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def edit_manifest(data: bytes, tmp: Path, **_) -> bytes:
    """Change what the manifest says (class names) and keep the old signature."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        signature = tar.extractfile("manifest.sig").read()
        model = tar.extractfile("files/model.onnx").read()
    manifest["class_names"] = ["a", "b", "anything-but-c"]
    edited = BundleManifest.model_validate(manifest)
    out = tmp / "edited.tar"
    write_archive(out, edited.canonical_bytes(), signature, [(edited.files[0], lambda: io.BytesIO(model))])
    return out.read_bytes()


def truncate(data: bytes, **_) -> bytes:
    info = _member(data, "files/model.onnx")
    return data[: info.offset_data + info.size // 2]


def traversal_entry(data: bytes, **_) -> bytes:
    info = tarfile.TarInfo("../../evil.sh")
    info.size = 9
    return _rebuild(data, extra=[(info, b"rm -rf /\n")])


def symlink_entry(data: bytes, **_) -> bytes:
    info = tarfile.TarInfo("files/model.onnx.link")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return _rebuild(data, extra=[(info, None)])


# name: (bundle version, how it is built or tampered, the reason it must be refused with)
TAMPERED = {
    "flipped-byte-in-model": (4, flip_model_byte, "sha256 of files/model.onnx is "),
    "edited-manifest": (4, edit_manifest, "signature does not verify with key "),
    "signed-by-unknown-key": (4, "foreign-key", ", which is not trusted (trusted: "),
    "truncated-archive": (4, truncate, "archive is truncated: the data of 'files/model.onnx' is cut short"),
    "path-traversal-entry": (4, traversal_entry,
                             "unsafe member name: path '../../evil.sh' has an empty, '.' or '..' component"),
    "symlink-entry": (4, symlink_entry,
                      "member 'files/model.onnx.link' is a symbolic link; only regular files are allowed"),
    "older-version-replay": (2, None, "version 2 is not newer than the active 3 (rollback protection)"),
    "wrong-hardware": (4, "engine-7.2", "wrong hardware: bundle 4 offers TensorRT engine for compute capability "
                                        "7.2 / TensorRT 10.3 and no ONNX fallback; this device has no GPU"),
}


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` with its content hash (or link target): to prove nothing changed."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_bundle_is_refused_with_its_reason_and_the_active_model_untouched(
        case, updater, publish_bundle, s3_store, signer, tmp_path, tiny_onnx) -> None:
    assert _install(updater, publish_bundle(3)) is State.STAGED
    updater.transition(Event.PROMOTE, "direct")
    updater.switch()
    updater.commit("healthy")
    active_slot = updater.slots.slot(3)
    before = _tree(active_slot)

    version, how, reason = TAMPERED[case]
    out = tmp_path / f"{case}.tar"
    if how == "engine-7.2":
        engine = tmp_path / "model.engine"
        engine.write_bytes(b"serialized engine" * 64)
        build_bundle(out, {"model.engine": engine}, private_key=signer, model_name="test", version=version,
                     class_names=["a", "b", "c"], input_spec=32,
                     runtimes=[RuntimeEntry(kind="tensorrt", file="model.engine", precision="fp16",
                                            target=HardwareTarget(gpu_compute_capability="7.2",
                                                                  tensorrt_version="10.3"))])
    else:
        build_bundle(out, {"model.onnx": tiny_onnx("m.onnx")},
                     private_key=generate_private_key() if how == "foreign-key" else signer,
                     model_name="test", version=version, class_names=["a", "b", "c"], input_spec=32)
    data = out.read_bytes()
    if callable(how):
        data = how(data, tmp=tmp_path)
        assert data != out.read_bytes()
    # What the store serves is what the command announces: the bundle itself must give it away.
    object_key = f"bundles/{case}-{uuid.uuid4().hex[:6]}.tar"
    s3_store.put_bytes(object_key, data)
    command = DeployCommand(device_id="cam-ota", version=version, mode="direct",
                            bundle_sha256=hashlib.sha256(data).hexdigest(), bundle_size=len(data),
                            bundle_url=s3_store.presigned_get(object_key, timedelta(minutes=5)))

    assert _install(updater, command) is State.REJECTED
    assert reason in updater.record.reason, updater.record.reason
    last = updater.events[-1]
    assert (last.from_state, last.to_state, last.event) == ("VERIFYING", "REJECTED", "verify_failed")
    assert last.reason == updater.record.reason and last.active_version == 3
    assert updater.slots.active() == 3 and updater.slots.candidate() is None
    assert updater.slots.installed() == [3]
    assert _tree(active_slot) == before
    updater.slots.verify(3, updater.trust)
    assert not list((tmp_path / "agent" / "downloads").iterdir())
    assert not [p for p in updater.slots.versions.iterdir() if p.name.startswith(".")]
    if case == "signed-by-unknown-key":
        assert key_id(signer.public_key()) in updater.record.reason  # names the key it does trust


# ---------------------------------------------------------------- the real agent: signed rollbacks, health


@pytest.fixture
def server_db(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'server.db'}")
    Base.metadata.create_all(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _register(sessions, bundles: Bundles, device_id: str) -> None:
    with sessions() as session:
        session.add(Device(id=device_id))
        for version, name in ((1, "v1"), (2, "v2")):
            path = bundles.paths[name]
            session.add(ModelVersion(version=version, name="detector", status="archived",
                                     bundle_key=bundles.object_keys[name], bundle_size=path.stat().st_size,
                                     bundle_sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
        session.commit()


def _start(agent, watch, *, baseline: bool = False) -> int:
    agent.start()
    wait_for(lambda: watch.status and watch.status.state == "online", "the agent's online status")
    if baseline:
        wait_for(lambda: watch.frames >= BASELINE_FRAMES, "frames served by the active model")
    return agent.proc.pid


def _events(watch, command_id: str) -> list[tuple[str, str, str]]:
    return [(e.from_state, e.to_state, e.event) for e in watch.updates if e.update_id == command_id]


@pytest.mark.parametrize("on_disk", [True, False], ids=["slot-on-disk", "slot-pruned"])
def test_server_signed_rollback_switches_the_running_agent_back(on_disk, bundles, agent_device, server_db,
                                                                s3_store) -> None:
    device_id, agent, watch = agent_device
    bundles.seed(agent.data_dir, {1: "v1", 2: "v2"} if on_disk else {2: "v2"}, active=2)
    _register(server_db, bundles, device_id)
    pid = _start(agent, watch)

    with server_db() as session:
        [deployment] = rollback_version(session, s3_store, watch.bus, bundles.key, 1, [device_id],
                                        reason="wave 2 failed its gates", presign_seconds=600, actor="test")
    wait_for(lambda: agent.record().state is State.ROLLED_BACK, "the rollback")
    wait_for(lambda: watch.status.active_version == 1, "status on version 1")
    frames_at_switch = watch.frames
    wait_for(lambda: watch.frames > frames_at_switch + 10, "frames served after the switch")
    assert agent.alive() and agent.proc.pid == pid  # switched between frames, no restart
    assert assert_serving_a_verified_model(agent, bundles.trust, {1}) == 1

    expected = [("IDLE", "ROLLING_BACK", "rollback"), ("ROLLING_BACK", "ROLLED_BACK", "switched")] if on_disk \
        else [("IDLE", "DOWNLOADING", "rollback_fetch"), ("DOWNLOADING", "VERIFYING", "downloaded"),
              ("VERIFYING", "STAGED", "verified"), ("STAGED", "ROLLING_BACK", "rollback"),
              ("ROLLING_BACK", "ROLLED_BACK", "switched")]
    wait_for(lambda: _events(watch, deployment.command_id) == expected,
             f"update events {expected}, got {_events(watch, deployment.command_id)}")
    first = next(e for e in watch.updates if e.update_id == deployment.command_id)
    assert "signed rollback to version 1 (wave 2 failed its gates)" in first.reason
    with server_db() as session:  # the server's ingest is not running here; the deployment row exists
        assert session.get(Deployment, deployment.id).mode == "rollback"


def test_forged_rollbacks_are_refused_and_reported_and_change_nothing(bundles, agent_device) -> None:
    device_id, agent, watch = agent_device
    bundles.seed(agent.data_dir, {1: "v1", 2: "v2"}, active=2)
    _start(agent, watch)
    expiry = datetime.now(UTC) + timedelta(hours=1)

    def command(**kw) -> RollbackCommand:
        return RollbackCommand(**({"device_id": device_id, "reason": "trust me", "expires_at": expiry,
                                   "to_version": 1} | kw))

    forged = {
        "unsigned": (command(), "rollback command is not signed"),
        "unknown-key": (sign_command(command(), generate_private_key()), "which is not trusted"),
        "edited": (sign_command(command(to_version=1), bundles.key).model_copy(update={"reason": "edited"}),
                   "rollback command signature does not verify with key"),
        "expired": (sign_command(command(expires_at=datetime(2024, 1, 1, tzinfo=UTC)), bundles.key),
                    "rollback command expired at 2024-01-01"),
    }
    for message, _ in forged.values():
        watch.send(message)
    for name, (message, reason) in forged.items():
        event = wait_for(lambda m=message: next((e for e in watch.updates if e.update_id == m.command_id), None),
                         f"the refusal of the {name} command")
        assert (event.from_state, event.to_state, event.event) == ("IDLE", "IDLE", "rollback_refused"), name
        assert event.reason.startswith("rollback refused: ") and reason in event.reason, (name, event.reason)
    assert agent.record().state is State.IDLE and agent.record().update_id == ""
    assert agent.alive() and assert_serving_a_verified_model(agent, bundles.trust, {2}) == 2
    assert watch.status.active_version == 2


def test_unhealthy_switch_rolls_back_by_itself_and_says_why(bundles, agent_device) -> None:
    device_id, agent, watch = agent_device
    bundles.seed(agent.data_dir, {1: "v1"}, active=1)
    pid = _start(agent, watch, baseline=True)
    command = bundles.deploy(device_id, "v2-blind", mode="direct")
    watch.send(command)
    wait_for(lambda: agent.record().state is State.ROLLED_BACK, "the automatic rollback")
    wait_for(lambda: ("ROLLING_BACK", "ROLLED_BACK", "switched") in _events(watch, command.command_id),
             "the rollback on the update topic")
    assert _events(watch, command.command_id)[-3:] == [
        ("PROMOTING", "CHECKING", "switched"), ("CHECKING", "ROLLING_BACK", "unhealthy"),
        ("ROLLING_BACK", "ROLLED_BACK", "switched")]
    unhealthy = next(e for e in watch.updates if e.update_id == command.command_id and e.event == "unhealthy")
    assert unhealthy.reason.startswith("detection rate collapsed: version 2 detected objects in 0% of 15 frames, "
                                       "version 1 in 100% of its last ")
    assert unhealthy.reason.endswith("; rolling back to version 1")
    assert agent.alive() and agent.proc.pid == pid
    assert assert_serving_a_verified_model(agent, bundles.trust, {1}) == 1
    assert not ModelSlots(agent.data_dir / "models").has(2)
    wait_for(lambda: watch.status.active_version == 1, "status back on version 1")
