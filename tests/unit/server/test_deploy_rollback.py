"""Server side of rollbacks: signed RollbackCommands (with the version's bundle, an expiry), one per
device, recorded as deployments and audited; refused for unknown or undeployable versions/devices."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from firmware_bundles import TrustStore, UnknownKey, generate_private_key, key_id
from firmware_bundles.commands import verify_command
from protocol import decode_message, device_topic, encode_message
from protocol.messages import DeployCommand, RollbackCommand
from protocol.topics import Channel
from server.db.models import AuditEntry, Base, Deployment, Device, ModelVersion
from server.deploy import CommandsNotSent, DeployError, deploy_version, rollback_version


class FakeStore:
    def presigned_get(self, key: str, expires: timedelta) -> str:
        return f"http://store/{key}?expires={int(expires.total_seconds())}"


class FakeBus:
    """Encodes and decodes each command the way the broker path does."""

    def __init__(self) -> None:
        self.sent: list = []

    def publish_command(self, device_id: str, command) -> None:
        topic = device_topic(device_id, Channel.COMMANDS)
        self.sent.append(decode_message(topic, encode_message(command)))


@pytest.fixture
def session():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with sessionmaker(engine, expire_on_commit=False)() as s:
        s.add_all([Device(id="cam-1"), Device(id="cam-2"), Device(id="cam-3", revoked=True)])
        s.add_all([
            ModelVersion(version=1, name="detector", status="archived", bundle_key="models/1/bundle.tar",
                         bundle_sha256="ab" * 32, bundle_size=1234),
            ModelVersion(version=2, name="detector", status="production", bundle_key="models/2/bundle.tar",
                         bundle_sha256="cd" * 32, bundle_size=2345),
            ModelVersion(version=3, name="detector", status="rejected"),
        ])
        s.commit()
        yield s


@pytest.fixture
def key():
    return generate_private_key()


def test_rollback_commands_are_signed_and_carry_the_bundle(session, key) -> None:
    bus = FakeBus()
    before = datetime.now(UTC)
    sent = rollback_version(session, FakeStore(), bus, key, 1, None, reason="wave 2 failed its gates",
                            presign_seconds=900, actor="alice")
    assert [d.device_id for d in sent] == ["cam-1", "cam-2"]  # revoked devices are skipped
    trust = TrustStore([key.public_key()])
    for command, deployment in zip(bus.sent, sent, strict=True):
        assert isinstance(command, RollbackCommand)
        assert verify_command(command, trust) == key_id(key.public_key())
        assert command.to_version == 1 and command.reason == "wave 2 failed its gates"
        assert command.bundle_url == "http://store/models/1/bundle.tar?expires=900"
        assert (command.bundle_sha256, command.bundle_size) == ("ab" * 32, 1234)
        assert before + timedelta(seconds=899) < command.expires_at < datetime.now(UTC) + timedelta(seconds=901)
        assert (deployment.command_id, deployment.mode, deployment.version) == (command.command_id, "rollback", 1)
    rows = session.scalars(select(Deployment)).all()
    assert {(d.device_id, d.mode, d.reason) for d in rows} == {
        ("cam-1", "rollback", "wave 2 failed its gates"), ("cam-2", "rollback", "wave 2 failed its gates")}
    audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "rollback")).one()
    assert audit.actor == "alice" and audit.target == "version:1"
    assert audit.detail["devices"] == ["cam-1", "cam-2"]


def test_a_device_trusting_other_keys_refuses_the_command(session, key) -> None:
    bus = FakeBus()
    rollback_version(session, FakeStore(), bus, key, 1, ["cam-1"], reason="r", presign_seconds=60, actor="a")
    with pytest.raises(UnknownKey):
        verify_command(bus.sent[0], TrustStore([generate_private_key().public_key()]))


@pytest.mark.parametrize(
    ("version", "devices", "message"),
    [(9, None, "model version 9 does not exist"),
     (3, None, "model version 3 has no deployable bundle (status rejected)"),
     (1, ["cam-1", "cam-9"], "unknown or revoked devices: cam-9"),
     (1, ["cam-3"], "unknown or revoked devices: cam-3")],
)
def test_rollback_is_refused_before_anything_is_sent(session, key, version, devices, message) -> None:
    bus = FakeBus()
    with pytest.raises(DeployError, match=re.escape(message)):
        rollback_version(session, FakeStore(), bus, key, version, devices, reason="r", presign_seconds=60,
                         actor="a")
    assert bus.sent == [] and session.scalars(select(Deployment)).all() == []


def test_deploy_still_sends_plain_deploy_commands(session) -> None:
    bus = FakeBus()
    sent = deploy_version(session, FakeStore(), bus, 2, ["cam-2"], mode="direct", shadow_frames=10,
                          presign_seconds=60, actor="a")
    assert [type(c) for c in bus.sent] == [DeployCommand] and sent[0].mode == "direct"
    assert bus.sent[0].bundle_sha256 == "cd" * 32


class CommittedFirstBus(FakeBus):
    """Checks, at each publish, that the command's deployment is already committed (visible to a
    second connection, as ingest's would be); refuses once ``refuse_after`` commands are out."""

    def __init__(self, engine, refuse_after: int | None = None) -> None:
        super().__init__()
        self.engine, self.refuse_after = engine, refuse_after

    def publish_command(self, device_id: str, command) -> None:
        if self.refuse_after is not None and len(self.sent) >= self.refuse_after:
            raise ConnectionError("the client is not currently connected")
        with sessionmaker(self.engine)() as other:
            assert other.scalar(select(Deployment).where(Deployment.command_id == command.command_id)) is not None
        super().publish_command(device_id, command)


@pytest.fixture
def file_session(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    with sessionmaker(engine, expire_on_commit=False)() as s:
        s.add_all([Device(id=f"cam-{i}") for i in range(1, 6)])
        s.add(ModelVersion(version=2, name="detector", status="production", bundle_key="models/2/bundle.tar",
                           bundle_sha256="cd" * 32, bundle_size=2345))
        s.commit()
        yield s


def test_deployments_are_committed_before_their_commands_go_out(file_session) -> None:
    bus = CommittedFirstBus(file_session.get_bind())
    sent = deploy_version(file_session, FakeStore(), bus, 2, None, mode="direct", shadow_frames=10,
                          presign_seconds=60, actor="a")
    assert [c.command_id for c in bus.sent] == [d.command_id for d in sent] and len(sent) == 5


@pytest.mark.parametrize("send", ["deploy", "rollback"])
def test_commands_the_broker_refuses_leave_their_deployments_failed(file_session, key, send) -> None:
    bus = CommittedFirstBus(file_session.get_bind(), refuse_after=2)
    with pytest.raises(CommandsNotSent, match="the broker took 2 of 5 commands"):
        if send == "deploy":
            deploy_version(file_session, FakeStore(), bus, 2, None, mode="direct", shadow_frames=10,
                           presign_seconds=60, actor="a")
        else:
            rollback_version(file_session, FakeStore(), bus, key, 2, None, reason="r", presign_seconds=60,
                             actor="a")
    file_session.expire_all()
    rows = file_session.scalars(select(Deployment).order_by(Deployment.id)).all()
    sent_ids = {c.command_id for c in bus.sent}
    assert [r.command_id in sent_ids for r in rows] == [True, True, False, False, False]
    assert [r.state for r in rows] == ["sent", "sent", "failed", "failed", "failed"]
    assert all(r.reason.startswith("command not sent: the client is not currently connected") for r in rows[2:])
