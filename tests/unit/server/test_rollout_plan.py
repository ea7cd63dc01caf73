"""Pure rollout planning: operator actions per state, wave sizes, which devices a wave takes, and
for one device its state, failures and the next command toward its goal."""

from __future__ import annotations

import pytest

from server.rollouts import plan
from server.rollouts.plan import DeviceFacts
from server.rollouts.spec import RolloutCreate, WaveSpec, check_waves


@pytest.mark.parametrize(("state", "action", "target"), [
    ("awaiting_approval", "approve", "running"),
    ("running", "pause", "paused"),
    ("pending", "pause", "paused"),
    ("paused", "resume", "running"),
    ("running", "abort", "aborted"),
    ("paused", "abort", "aborted"),
    ("running", "rollback", "rolled_back"),
    ("succeeded", "rollback", "rolled_back"),
    ("aborted", "rollback", "rolled_back"),
])
def test_operator_actions_allowed(state, action, target):
    assert plan.operator_transition(state, action) == target


@pytest.mark.parametrize(("state", "action"), [
    ("running", "approve"), ("paused", "pause"), ("running", "resume"), ("succeeded", "abort"),
    ("aborted", "abort"), ("rolled_back", "rollback"), ("awaiting_approval", "pause"), ("succeeded", "resume"),
])
def test_operator_actions_refused_with_a_reason(state, action):
    with pytest.raises(plan.RolloutConflict, match=f"cannot {action} a rollout that is {state.replace('_', ' ')}"):
        plan.operator_transition(state, action)


def test_wave_quota_percent_is_cumulative_count_is_the_wave_size():
    # 20 devices: canary 1, then 10% (2 in all -> 1 more), 50% (10 -> 8 more), 100% (20 -> 10 more)
    assert plan.wave_quota(None, 1, 20, 0, 0) == 1
    assert plan.wave_quota(10, None, 20, 1, 0) == 1
    assert plan.wave_quota(50, None, 20, 2, 0) == 8
    assert plan.wave_quota(100, None, 20, 10, 0) == 10
    # 3 devices: 10% rounds up to 1, already covered by the canary: an empty wave
    assert plan.wave_quota(10, None, 3, 1, 0) == 0
    # topping up: a device enrolled while the last wave runs
    assert plan.wave_quota(100, None, 21, 10, 10) == 1
    assert plan.wave_quota(None, 1, 21, 0, 1) == 0
    # float noise does not add a device: 30% of 10 is 3
    assert plan.wave_quota(30, None, 10, 0, 0) == 3


def test_choose_prefers_online_devices_with_a_model_in_id_order():
    candidates = [plan.Candidate("c", True, 1), plan.Candidate("a", False, 1), plan.Candidate("b", True, None),
                  plan.Candidate("d", True, 1)]
    assert plan.choose(candidates, 1, last_wave=False) == ["c"]
    assert plan.choose(candidates, 5, last_wave=False) == ["c", "d"]  # no offline, no model-less device
    assert plan.choose(candidates, 5, last_wave=True) == ["c", "d", "b"]


def test_wave_specs_are_validated():
    with pytest.raises(ValueError, match="exactly one of percent or count"):
        WaveSpec(name="x", percent=10, count=1)
    with pytest.raises(ValueError, match="cumulative"):
        check_waves([WaveSpec(name="a", percent=50), WaveSpec(name="b", percent=10)])
    with pytest.raises(ValueError, match="unique"):
        check_waves([WaveSpec(name="a", count=1), WaveSpec(name="a", percent=100)])
    with pytest.raises(ValueError, match="unknown gates: min_vibes"):
        RolloutCreate(gates={"min_vibes": 1})


@pytest.mark.parametrize(("facts", "state"), [
    (DeviceFacts(goal="shadow"), "pending"),
    (DeviceFacts(goal="stop"), "aborted"),  # never sent anything
    (DeviceFacts(goal="shadow", deployed=True, update_state="sent"), "deploying"),
    (DeviceFacts(goal="shadow", deployed=True, update_state="VERIFYING"), "deploying"),
    (DeviceFacts(goal="shadow", deployed=True, update_state="SHADOWING"), "shadowing"),
    (DeviceFacts(goal="switch", deployed=True, promoted=True, update_state="SHADOWING"), "promoting"),
    (DeviceFacts(goal="switch", deployed=True, promoted=True, update_state="CHECKING"), "promoting"),
    (DeviceFacts(goal="switch", deployed=True, promoted=True, update_state="ACTIVE"), "active"),
    (DeviceFacts(goal="revert", deployed=True, aborted=True, update_state="SHADOWING"), "aborting"),
    (DeviceFacts(goal="revert", deployed=True, aborted=True, update_state="REJECTED"), "aborted"),
    (DeviceFacts(goal="shadow", deployed=True, update_state="REJECTED"), "failed"),
    (DeviceFacts(goal="shadow", deployed=True, update_state="FAILED"), "failed"),
    (DeviceFacts(goal="revert", deployed=True, update_state="ACTIVE", rolled_back=True), "rolling_back"),
    (DeviceFacts(goal="revert", deployed=True, update_state="ACTIVE", rolled_back=True,
                 rollback_state="ROLLED_BACK"), "rolled_back"),
    (DeviceFacts(goal="revert", deployed=True, update_state="ACTIVE", rolled_back=True,
                 rollback_state="FAILED"), "failed"),
])
def test_device_state_from_reports_and_commands(facts, state):
    assert plan.device_state(facts) == state


def test_failures_are_what_the_device_did_on_its_own():
    assert "refused the candidate: bad signature" in plan.observed_failure(
        DeviceFacts(goal="shadow", deployed=True, update_state="REJECTED", reason="bad signature"))
    assert plan.observed_failure(DeviceFacts(goal="revert", deployed=True, aborted=True,
                                             update_state="REJECTED")) == ""
    assert "switched back by itself" in plan.observed_failure(
        DeviceFacts(goal="switch", deployed=True, promoted=True, update_state="ROLLED_BACK"))
    assert plan.observed_failure(DeviceFacts(goal="switch", deployed=True, update_state="ACTIVE")) == ""


@pytest.mark.parametrize(("facts", "command"), [
    (DeviceFacts(goal="shadow"), "deploy"),
    (DeviceFacts(goal="shadow", deployed=True, update_state="SHADOWING"), None),  # holds: the server decides
    (DeviceFacts(goal="switch", deployed=True, update_state="SHADOWING"), "promote"),
    (DeviceFacts(goal="switch", deployed=True, update_state="STAGED"), None),  # promoted once it shadows
    (DeviceFacts(goal="switch", deployed=True, promoted=True, update_state="SHADOWING"), None),
    (DeviceFacts(goal="shadow", failure="timed out"), None),
    (DeviceFacts(goal="stop"), None),
    (DeviceFacts(goal="stop", deployed=True, update_state="DOWNLOADING"), "abort"),
    (DeviceFacts(goal="stop", deployed=True, update_state="sent"), "abort"),
    (DeviceFacts(goal="stop", deployed=True, update_state="ACTIVE"), None),  # abort leaves switched devices
    (DeviceFacts(goal="revert", deployed=True, update_state="SHADOWING"), "abort"),
    (DeviceFacts(goal="revert", deployed=True, update_state="PROMOTING"), None),  # wait for the switch
    (DeviceFacts(goal="revert", deployed=True, update_state="CHECKING", from_version=3), "rollback"),
    (DeviceFacts(goal="revert", deployed=True, update_state="ACTIVE", from_version=3), "rollback"),
    (DeviceFacts(goal="revert", deployed=True, update_state="ACTIVE", from_version=None), None),
    (DeviceFacts(goal="revert", deployed=True, update_state="ACTIVE", from_version=3, rolled_back=True), None),
])
def test_next_command_toward_the_goal(facts, command):
    assert plan.next_command(facts) == command


def test_resend_only_what_is_unacknowledged_and_still_wanted():
    sent = DeviceFacts(goal="shadow", deployed=True, update_state="sent")
    assert plan.worth_resending("deploy", sent)
    assert not plan.worth_resending("deploy", DeviceFacts(goal="shadow", deployed=True, update_state="DOWNLOADING"))
    assert not plan.worth_resending("deploy", DeviceFacts(goal="stop", deployed=True, aborted=True,
                                                          update_state="sent"))
    holding = DeviceFacts(goal="switch", deployed=True, promoted=True, update_state="SHADOWING")
    assert plan.worth_resending("promote", holding)
    assert not plan.worth_resending("promote", DeviceFacts(goal="switch", deployed=True, promoted=True,
                                                           update_state="PROMOTING"))
    rolling = DeviceFacts(goal="revert", deployed=True, update_state="ACTIVE", rolled_back=True, from_version=1)
    assert plan.worth_resending("rollback", rolling)
    assert not plan.worth_resending("rollback", DeviceFacts(goal="revert", deployed=True, update_state="ACTIVE",
                                                            rolled_back=True, rollback_state="ROLLING_BACK"))


def test_settled_per_goal():
    assert plan.settled(DeviceFacts(goal="shadow", deployed=True, update_state="SHADOWING"))
    assert not plan.settled(DeviceFacts(goal="switch", deployed=True, promoted=True, update_state="SHADOWING"))
    assert plan.settled(DeviceFacts(goal="switch", deployed=True, promoted=True, update_state="ACTIVE"))
    assert plan.settled(DeviceFacts(goal="stop", deployed=True, update_state="ACTIVE"))
    assert not plan.settled(DeviceFacts(goal="revert", deployed=True, update_state="ACTIVE", from_version=1))
    assert plan.settled(DeviceFacts(goal="revert", deployed=True, update_state="ACTIVE", from_version=None))
    assert plan.settled(DeviceFacts(goal="revert", deployed=True, aborted=True, update_state="REJECTED"))
