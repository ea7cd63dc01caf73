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

import signal
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from edge_agent.ota.slots import ModelSlots
from edge_agent.ota.states import RESTING, State
from firmware_bundles.commands import sign_command
from protocol.messages import RollbackCommand

pytest.register_assert_rewrite("ota_kit")
from ota_kit import BASELINE_FRAMES, Bundles, assert_serving_a_verified_model, log_entries, wait_for  # noqa: E402

pytestmark = pytest.mark.integration
pytest_plugins = ["ota_kit"]  # fixtures: bundles, frames, agent_device


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
def test_sigkill_at_each_state_resumes_to_the_right_end_serving_a_verified_model(case, bundles, agent_device) -> None:
    device_id, agent, watch = agent_device
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
    wait_for(lambda: watch.status.state == "offline", "the broker's last will for the killed agent")
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
    resume = wait_for(lambda: next((e for e in watch.updates if e.update_id == command.command_id
                                    and e.event == "resume"), None), "the restart reported on the update topic")
    assert resume.from_state == resume.to_state == state_at_kill
    wait_for(lambda: any(e.to_state == case.end_state.value and e.event != "resume" for e in watch.updates
                         if e.update_id == command.command_id) or state_at_kill == case.end_state.value,
             "the final transition on the update topic")
    ours = [e for e in watch.updates if e.update_id == command.command_id]
    assert all(e.reason for e in ours), "every transition is reported with a reason"
    if case.crash_at == "DOWNLOADING+partial":  # the second start asked only for the missing bytes
        offsets = [entry["resume_from"] for entry in log_entries(agent) if entry.get("event") == "ota.download"]
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


def test_an_update_that_kills_the_agent_every_time_is_given_up_and_rolled_back(bundles, agent_device) -> None:
    device_id, agent, watch = agent_device
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
