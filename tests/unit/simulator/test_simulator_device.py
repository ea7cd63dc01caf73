"""The simulated device's state machine: each command's event sequence, as the real agent reports it,
and its failure modes (slow, refusing, offline), without any I/O."""

from __future__ import annotations

import random

import pytest

from edgeloop.simulator.device import NORMAL, OFFLINE, REFUSING, SLOW, FleetProfile, SimDevice, Timings
from protocol import (
    AbortCommand,
    DeployCommand,
    PromoteCommand,
    RollbackCommand,
    decode_message,
    device_topic,
)
from protocol import encode_message as encode

DEV = "sim-00001"


def deploy(version=2, **kw) -> DeployCommand:
    return DeployCommand(device_id=DEV, version=version, bundle_url="http://store/b.tar", bundle_sha256="ab" * 32,
                         bundle_size=10_000_000, **kw)


def device(**kw) -> SimDevice:
    return SimDevice(DEV, timings=Timings(jitter=0.0), rng=random.Random(1), **kw)


def run(dev: SimDevice, command) -> list[tuple[str, str, str]]:
    """Apply every step the command leads to; (from, to, event) of each published update."""
    out = []
    for step in dev.on_command(command):
        event = dev.apply(step)
        if event is not None:
            # What goes on the wire is a valid update message for this device's topic.
            assert decode_message(device_topic(DEV, "update"), encode(event)) == event
            out.append((event.from_state, event.to_state, event.event))
    return out


def test_deploy_awaiting_promotion_shadows_until_promoted():
    dev = device()
    command = deploy(await_promotion=True)
    assert run(dev, command) == [("ACTIVE", "DOWNLOADING", "deploy"), ("DOWNLOADING", "VERIFYING", "downloaded"),
                                 ("VERIFYING", "STAGED", "verified"), ("STAGED", "SHADOWING", "start_shadow")]
    assert dev.shadowing and dev.candidate_version == 2 and dev.active_version == 1
    report = dev.shadow_report()
    assert report.update_id == command.command_id and report.candidate_version == 2 and report.window == 1
    assert run(dev, PromoteCommand(device_id=DEV, version=2)) == [
        ("SHADOWING", "PROMOTING", "shadow_passed"), ("PROMOTING", "CHECKING", "switched"),
        ("CHECKING", "ACTIVE", "healthy")]
    assert dev.active_version == 2 and dev.candidate_version is None and dev.shadow_report() is None


def test_deploy_without_await_promotes_itself_after_its_shadow_frames():
    dev = device()
    steps = dev.on_command(deploy(shadow_frames=150))
    assert [s.to_state for s in steps] == ["DOWNLOADING", "VERIFYING", "STAGED", "SHADOWING", "PROMOTING",
                                           "CHECKING", "ACTIVE"]
    shadow = next(s for s in steps if s.to_state == "PROMOTING")
    assert shadow.delay == pytest.approx(150 / dev.timings.fps)
    # The download takes the bundle's size over the device's bandwidth.
    assert steps[1].delay == pytest.approx(10_000_000 / dev.timings.download_bytes_per_s)


def test_direct_deploy_switches_without_shadow():
    dev = device(active_version=None)
    assert run(dev, deploy(mode="direct")) == [
        ("IDLE", "DOWNLOADING", "deploy"), ("DOWNLOADING", "VERIFYING", "downloaded"),
        ("VERIFYING", "STAGED", "verified"), ("STAGED", "PROMOTING", "promote"),
        ("PROMOTING", "CHECKING", "switched"), ("CHECKING", "ACTIVE", "healthy")]
    assert dev.active_version == 2


def test_abort_rejects_and_drops_the_rest_of_the_update():
    dev = device()
    steps = dev.on_command(deploy(await_promotion=True))
    dev.apply(steps[0])  # DOWNLOADING
    assert run(dev, AbortCommand(device_id=DEV, version=2, reason="canary failed")) == [
        ("DOWNLOADING", "REJECTED", "abort")]
    # The download finishing later changes nothing.
    assert [dev.apply(s) for s in steps[1:]] == [None, None, None]
    assert dev.state == "REJECTED" and dev.active_version == 1 and dev.candidate_version is None


def test_commands_for_another_version_or_repeated_are_ignored():
    dev = device()
    command = deploy(await_promotion=True)
    run(dev, command)
    assert dev.on_command(command) == []  # QoS 1 redelivery
    assert dev.on_command(deploy(version=3)) == []  # busy: not resting
    assert dev.on_command(PromoteCommand(device_id=DEV, version=3)) == []
    assert dev.on_command(AbortCommand(device_id=DEV, version=3)) == []


def test_rollback_switches_back_and_a_bad_signature_is_refused():
    dev = device(active_version=3)
    assert run(dev, RollbackCommand(device_id=DEV, to_version=2, reason="ops")) == [
        ("ACTIVE", "ROLLING_BACK", "rollback"), ("ROLLING_BACK", "ROLLED_BACK", "switched")]
    assert dev.active_version == 2

    def refuse(_command):
        raise ValueError("rollback command is not signed")

    strict = device(active_version=3, verify_rollback=refuse)
    assert run(strict, RollbackCommand(device_id=DEV, to_version=2)) == [("ACTIVE", "ACTIVE", "rollback_refused")]
    assert strict.active_version == 3
    # Not older than the active version: refused, as the agent does.
    assert run(device(active_version=2), RollbackCommand(device_id=DEV, to_version=2))[0][2] == "rollback_refused"


def test_rollback_while_shadowing_aborts_the_update_first():
    dev = device(active_version=2)
    run(dev, deploy(version=3, await_promotion=True))
    assert run(dev, RollbackCommand(device_id=DEV, to_version=1)) == [
        ("SHADOWING", "REJECTED", "abort"), ("REJECTED", "ROLLING_BACK", "rollback"),
        ("ROLLING_BACK", "ROLLED_BACK", "switched")]
    assert dev.active_version == 1


def test_refusing_device_rejects_the_bundle():
    dev = device(behaviour=REFUSING)
    assert run(dev, deploy(await_promotion=True))[-1] == ("VERIFYING", "REJECTED", "verify_failed")
    assert dev.active_version == 1 and dev.candidate_version is None


def test_slow_device_takes_longer():
    fast, slow = device(), device(behaviour=SLOW)
    total = [sum(s.delay for s in d.on_command(deploy(mode="direct"))) for d in (fast, slow)]
    assert total[1] == pytest.approx(total[0] * fast.timings.slow_factor)
    assert slow.heartbeat(5).fps < fast.heartbeat(5).fps


def test_profile_draws_shares_stably():
    profile = FleetProfile(offline=0.1, slow=0.2, refusing=0.05, seed=3)
    ids = [f"sim-{i:05d}" for i in range(4000)]
    kinds = [profile.behaviour(i) for i in ids]
    assert kinds == [profile.behaviour(i) for i in ids]  # stable
    share = {k: kinds.count(k) / len(ids) for k in (OFFLINE, SLOW, REFUSING, NORMAL)}
    assert share[OFFLINE] == pytest.approx(0.1, abs=0.02) and share[SLOW] == pytest.approx(0.2, abs=0.02)
    assert share[REFUSING] == pytest.approx(0.05, abs=0.015)
    with pytest.raises(ValueError):
        FleetProfile(offline=0.6, slow=0.6)


def test_periodic_messages_are_valid_on_their_channels():
    dev = device()
    for channel, message in (("heartbeat", dev.heartbeat(5)), ("drift", dev.drift_report()),
                             ("status", dev.status_message()), ("status", dev.status_message("offline")),
                             ("samples", dev.sample_event(object_key="images/x.png", sha256="0" * 64,
                                                          size_bytes=100, width=64, height=64))):
        assert decode_message(device_topic(DEV, channel), encode(message)) == message
