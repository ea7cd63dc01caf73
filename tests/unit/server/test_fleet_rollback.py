"""Production follows the fleet, the fleet rolls back to any version, and devices that no
rollout owns converge on production: pure rules, then the simulated fleet of the rollout
controller's tests (real SQLite, real signed commands, agents as state machines)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from test_rollout_controller import Sim

from protocol.messages import DeployCommand, RollbackCommand
from server import registry
from server.db.models import AliasChange, AuditEntry, Deployment, Device, ModelVersion, utcnow
from server.fleet_convergence import (
    DEPLOY,
    INSTALL,
    ROLLBACK,
    Action,
    CommandsSince,
    DeviceFacts,
    FleetConvergence,
    convergence_actions,
)
from server.fleet_rollback import FleetDevice, FleetRollbackError, plan_fleet_rollback, roll_fleet_back
from server.rollouts.spec import WaveSpec

ONE_WAVE = [WaveSpec(name="all", percent=100)]


# ------------------------------------------------------------------ pure rules


def test_plan_sends_a_command_only_where_no_rollout_takes_the_device_back():
    devices = [FleetDevice("a", 3, True), FleetDevice("b", 1, True), FleetDevice("c", None, True),
               FleetDevice("d", 3, False, rollout_from_version=1), FleetDevice("e", 3, True, rollout_from_version=2),
               FleetDevice("f", 2, True, in_other_rollout=True)]
    plan = plan_fleet_rollback(devices, 1)
    assert plan.commanded == ["a"]  # on 1 already, or without a model: nothing to do
    assert plan.reverted_by_rollout == ["d"]  # its rollout's revert lands on 1
    assert plan.left == ["e", "f"]  # reverts to 2 first / owned by another rollout


def _since(**kw) -> dict:
    return {k: CommandsSince(**v) for k, v in kw.items()}


def test_convergence_sends_production_to_free_devices_only(tmp_path):
    sim = Sim(tmp_path, 0)  # a clock only
    now = sim.clock.now
    devices = [DeviceFacts("on", True, 2), DeviceFacts("behind", True, 1), DeviceFacts("ahead", True, 3),
               DeviceFacts("new", True, None), DeviceFacts("away", False, 1), DeviceFacts("busy", True, 1, "", True),
               DeviceFacts("updating", True, 1, "DOWNLOADING"), DeviceFacts("moved", True, 3),
               DeviceFacts("sent", True, 1), DeviceFacts("tired", True, 1), DeviceFacts("due", True, 1)]
    since = _since(moved={"operators": 1}, sent={"ours": 1, "last_ours_at": now - timedelta(seconds=5)},
                   tired={"ours": 3, "last_ours_at": now - timedelta(hours=1)},
                   due={"ours": 1, "last_ours_at": now - timedelta(seconds=60)})
    actions = convergence_actions(devices, 2, since, now=now, resend_seconds=30, max_sends=3)
    assert actions == [Action("behind", DEPLOY, 2), Action("ahead", ROLLBACK, 2), Action("new", INSTALL, 2),
                       Action("due", DEPLOY, 2)]


# ------------------------------------------------------------------ the simulated fleet


def _fleet(tmp_path, n=4, **kw) -> Sim:
    sim = Sim(tmp_path, n, waves=ONE_WAVE, **kw)
    with sim.sessions() as session:  # v1 is production and the fleet runs it; v2 was approved
        registry.set_alias(session, registry.PRODUCTION, 1, actor="seed")
        session.get(ModelVersion, 2).status = registry.APPROVED
        session.add(ModelVersion(version=3, name="detector", status="candidate", bundle_key="models/3/bundle.tar",
                                 bundle_sha256="cd" * 32, bundle_size=1003))
        session.commit()
    return sim


def _production(sim) -> int | None:
    with sim.sessions() as session:
        mv = registry.production(session)
        return mv.version if mv else None


def _statuses(sim) -> dict[int, str]:
    with sim.sessions() as session:
        return {m.version: m.status for m in session.scalars(select(ModelVersion))}


def _roll_back(sim, to_version=None, reason="line 3 misses dents") -> dict:
    with sim.sessions() as session:
        return roll_fleet_back(session, None, sim.bus, sim.key, to_version=to_version, actor="olga", reason=reason,
                               source="test", presign_seconds=3600)


def _deliver(sim) -> None:
    for device_id, command in sim.bus.take():
        for message in sim.agents[device_id].on_command(command):
            sim.deliver(message)


@pytest.fixture(autouse=True)
def _store_for_rollbacks(monkeypatch):
    # roll_fleet_back passes its store to deploy.rollback_version, which presigns the bundle URL.
    from test_rollout_controller import FakeStore

    import server.deploy as deploy

    real = deploy.bundle_url
    monkeypatch.setattr(deploy, "bundle_url", lambda store, mv, s: real(store or FakeStore(), mv, s))


def test_production_moves_when_the_whole_fleet_rollout_completes_not_before(tmp_path):
    sim = _fleet(tmp_path)
    rid = sim.create()
    sim.run_until(rid, lambda v: any(d["state"] == "shadowing" for w in v["waves"] for d in w["devices"]))
    assert _production(sim) == 1  # shadowing: the fleet still runs 1
    sim.run_until(rid, lambda v: v["state"] == "succeeded")
    assert _production(sim) == 2 and _statuses(sim)[1] == "archived"
    with sim.sessions() as session:
        moves = [(c.name, c.version, c.actor) for c in session.scalars(select(AliasChange).order_by(AliasChange.id))]
        assert moves[-2:] == [("previous", 1, "rollout-controller"), ("production", 2, "rollout-controller")]
        assert session.scalar(select(AuditEntry).where(AuditEntry.action == "model.promote")).target == "version:2"


def test_a_rollout_to_some_devices_leaves_production_as_it_is(tmp_path):
    sim = _fleet(tmp_path)
    rid = sim.create(selector={"devices": ["cam-1", "cam-2"]})
    sim.run_until(rid, lambda v: v["state"] == "succeeded")
    assert _production(sim) == 1 and sim.agents["cam-1"].active == 2 and sim.agents["cam-3"].active == 1


def test_fleet_rollback_moves_production_and_sends_signed_commands_twice_over(tmp_path):
    sim = _fleet(tmp_path)
    sim.run_until(sim.create(), lambda v: v["state"] == "succeeded" and v["settled"])
    with sim.sessions() as session:  # then v3 goes out as well
        session.get(ModelVersion, 3).status = registry.APPROVED
        session.commit()
    with sim.sessions() as session:
        from server.rollouts import api
        from server.rollouts.spec import RolloutCreate

        rid = api.create_rollout(session, RolloutCreate(version=3), sim.policy, actor="op").id
    sim.run_until(rid, lambda v: v["state"] == "succeeded" and v["settled"])
    assert _production(sim) == 3 and {a.active for a in sim.agents.values()} == {3}

    first = _roll_back(sim)  # no version: the production before this one
    assert (first["from_version"], first["to_version"], first["registry_moved"]) == (3, 2, True)
    assert first["commanded"] == sorted(sim.agents) and first["rollout_rolled_back"] is None
    _deliver(sim)
    assert {a.active for a in sim.agents.values()} == {2}
    assert all(c.to_version == 2 and c.signature for c in sim.bus.of(RollbackCommand))  # verified by each agent
    assert _production(sim) == 2 and _statuses(sim)[3] == "rolled_back"

    second = _roll_back(sim)  # again: one further back, not to the rolled-back 3
    assert (second["from_version"], second["to_version"]) == (2, 1)
    _deliver(sim)
    assert {a.active for a in sim.agents.values()} == {1} and _production(sim) == 1

    with pytest.raises(FleetRollbackError, match="no earlier production version"):
        _roll_back(sim)
    with sim.sessions() as session:
        entries = session.scalars(select(AuditEntry).where(AuditEntry.action == "fleet.rollback")
                                  .order_by(AuditEntry.id)).all()
        assert [e.target for e in entries] == ["version:2", "version:1"]
        assert entries[0].actor == "olga" and entries[0].detail["commanded"] == sorted(sim.agents)
        assert entries[0].detail["reason"] == "line 3 misses dents"


def test_fleet_rollback_during_a_rollout_rolls_the_rollout_back(tmp_path):
    sim = _fleet(tmp_path, 2, auto_waves=ONE_WAVE)
    sim.agents["cam-1"].holds = False  # switches by itself: it runs 2 when the operator acts
    rid = sim.create()
    sim.run_until(rid, lambda v: sim.agents["cam-1"].active == 2)
    result = _roll_back(sim)
    assert result["to_version"] == 1 and not result["registry_moved"] and result["rollout_rolled_back"] == rid
    assert "cam-1" in result["reverted_by_rollout"] and not result["commanded"]
    sim.run_until(rid, lambda v: v["state"] == "rolled_back" and v["settled"])
    assert {a.active for a in sim.agents.values()} == {1}
    assert _production(sim) == 1 and _statuses(sim)[2] == "rolled_back"


def test_refuses_what_cannot_be_rolled_back_to(tmp_path):
    sim = _fleet(tmp_path, 1)
    with pytest.raises(FleetRollbackError, match="is candidate"):
        _roll_back(sim, to_version=3)
    with pytest.raises(FleetRollbackError, match="does not exist"):
        _roll_back(sim, to_version=9)
    with pytest.raises(FleetRollbackError, match="no device runs another version"):
        _roll_back(sim, to_version=1)


def _convergence(sim) -> FleetConvergence:
    from test_rollout_controller import FakeStore

    # The wall clock, as the deployments' rows (the sim's clock runs ahead of it).
    return FleetConvergence(sim.sessions, FakeStore(), lambda: sim.bus, sim.key, presign_seconds=3600,
                            shadow_frames=20, resend_seconds=10, max_sends=3, interval=1)


def test_devices_that_come_later_get_production_and_an_operators_choice_stands(tmp_path):
    sim = _fleet(tmp_path, 2)
    sim.run_until(sim.create(), lambda v: v["state"] == "succeeded" and v["settled"])
    with sim.sessions() as session:  # after the rollout: one enrolls, one was away, one an operator moved
        session.add(Device(id="late", online=True, active_version=None))
        session.add(Device(id="away", online=False, active_version=1, update_state="ACTIVE"))
        session.add(Device(id="pinned", online=True, active_version=1, update_state="ACTIVE"))
        session.add(Deployment(device_id="pinned", version=1, command_id="c" * 16, mode="direct",
                               reason="", created_at=utcnow() + timedelta(seconds=1)))
        session.commit()
    converge = _convergence(sim)
    sent = converge.run_once()
    assert sent == [Action("late", INSTALL, 2)]
    (command,) = sim.bus.of(DeployCommand, "late")
    assert command.version == 2 and command.mode == "direct"
    assert converge.run_once() == []  # not again before resend_seconds
    with sim.sessions() as session:
        session.get(Device, "away").online = True
        session.commit()
    assert converge.run_once() == [Action("away", DEPLOY, 2)]
    with sim.sessions() as session:  # 11 s later
        for row in session.scalars(select(Deployment).where(Deployment.reason.startswith("converge"))):
            row.created_at -= timedelta(seconds=11)
        session.commit()
    assert sorted(a.device_id for a in converge.run_once()) == ["away", "late"]  # still not there: resent
    with sim.sessions() as session:
        assert session.scalar(select(AuditEntry).where(AuditEntry.actor == "fleet-convergence")) is not None


def test_convergence_leaves_devices_a_rollout_owns(tmp_path):
    sim = _fleet(tmp_path, 2)
    sim.create()
    sim.step()  # the rollout took both devices; production is still 1, the devices on their way to 2
    with sim.sessions() as session:
        session.get(Device, "cam-1").active_version = 2
        session.commit()
    assert _convergence(sim).run_once() == []


def test_convergence_leaves_a_group_rollout_s_devices_on_their_version(tmp_path):
    sim = _fleet(tmp_path, 3)
    sim.run_until(sim.create(selector={"devices": ["cam-1"]}), lambda v: v["state"] == "succeeded" and v["settled"])
    assert _production(sim) == 1 and sim.agents["cam-1"].active == 2
    assert _convergence(sim).run_once() == []  # cam-1 is ahead of production by a rollout's choice
