"""The rollout controller against a simulated fleet: real database (SQLite), real ingest path
(messages encoded, decoded and handled by IngestService), real signed commands; the agents are
small state machines that answer commands the way edge_agent's update flow does. A fake clock
makes shadow time and timeouts deterministic."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.orm import sessionmaker

from firmware_bundles import TrustStore, generate_private_key
from firmware_bundles.commands import verify_command
from protocol import decode_message, device_topic, encode_message
from protocol.messages import (
    AbortCommand,
    DeployCommand,
    PromoteCommand,
    RollbackCommand,
    ShadowReport,
    UpdateEvent,
    channel_of,
)
from protocol.topics import Channel
from server import metrics
from server.db.models import (
    AuditEntry,
    Base,
    Deployment,
    Device,
    ModelVersion,
    Rollout,
    RolloutCommand,
    RolloutDevice,
    utcnow,
)
from server.ingest import IngestService
from server.rollouts import api
from server.rollouts.controller import RolloutController
from server.rollouts.spec import GateConfig, RolloutCreate, WaveSpec
from server.sample_validation import ImageLimits
from server.settings import RolloutPolicy

STEP = timedelta(seconds=5)
GATES = GateConfig(min_frames=100, min_shadow_seconds=10, min_agreement=0.9, max_latency_p99_ms=100,
                   max_errors=0, max_install_failure_rate=0.0)
WAVES = [WaveSpec(name="canary", count=1), WaveSpec(name="half", percent=50), WaveSpec(name="all", percent=100)]


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


class FakeStore:
    def presigned_get(self, key: str, expires: timedelta) -> str:
        return f"http://store/{key}"


class Bus:
    """Round-trips every command through its wire format; can lose the next N of a device's commands."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []
        self.queue: list[tuple[str, object]] = []
        self.lose: dict[str, int] = {}
        self.lock = threading.Lock()

    def publish_command(self, device_id: str, command) -> None:
        decoded = decode_message(device_topic(device_id, Channel.COMMANDS), encode_message(command))
        with self.lock:
            self.sent.append((device_id, decoded))
            if self.lose.get(device_id):
                self.lose[device_id] -= 1
                return
            self.queue.append((device_id, decoded))

    def take(self) -> list[tuple[str, object]]:
        with self.lock:
            out, self.queue = self.queue, []
        return out

    def of(self, kind: type, device: str | None = None) -> list:
        return [c for d, c in self.sent if isinstance(c, kind) and (device is None or d == device)]


class SimAgent:
    """The agent's update flow as the server sees it: UpdateEvents and ShadowReports."""

    def __init__(self, device_id: str, active: int | None = 1, *, agreement: float = 0.98, holds: bool = True,
                 responsive: bool = True, healthy: bool = True, frames: int | None = None,
                 active_right: float = 0.9, candidate_only: float = 0.1, active_only: float = 0.0,
                 trust: TrustStore) -> None:
        # Every frame's truth is known: the active model right on `active_right` of them, the candidate
        # alone right on `candidate_only`, the active model alone on `active_only` (a better candidate).
        self.active_right, self.candidate_only, self.active_only = active_right, candidate_only, active_only
        self.device_id, self.active, self.agreement, self.holds = device_id, active, agreement, holds
        self.responsive, self.healthy, self.frames, self.trust = responsive, healthy, frames, trust
        self.state, self.update_id, self.version, self.window = "IDLE" if active is None else "ACTIVE", "", 0, 0
        self.seen_rollbacks: set[str] = set()
        self.served: set[int] = {active} if active else set()

    def _go(self, to: str, event: str, reason: str = "", update_id: str | None = None) -> UpdateEvent:
        before, self.state = self.state, to
        return UpdateEvent(device_id=self.device_id, update_id=update_id or self.update_id, version=self.version,
                           from_state=before, to_state=to, event=event, reason=reason, active_version=self.active)

    def _switch(self) -> list:
        out = [self._go("PROMOTING", "promote")]
        if not self.healthy:
            return out + [self._go("ROLLED_BACK", "switch_failed", "health check failed")]
        self.active = self.version
        self.served.add(self.version)
        return out + [self._go("CHECKING", "switched"), self._go("ACTIVE", "healthy")]

    def on_command(self, command) -> list:
        if not self.responsive:
            return []
        if isinstance(command, DeployCommand):
            if command.command_id == self.update_id or self.state not in {"IDLE", "ACTIVE", "REJECTED",
                                                                           "ROLLED_BACK", "FAILED"}:
                return []
            self.update_id, self.version = command.command_id, command.version
            self.holds_now = command.await_promotion and self.holds
            self.window_frames = self.frames or command.shadow_frames
            out = [self._go("DOWNLOADING", "deploy"), self._go("VERIFYING", "downloaded"),
                   self._go("STAGED", "verified")]
            if command.mode == "direct" or self.active is None:
                return out + self._switch()
            return out + [self._go("SHADOWING", "start_shadow")]
        if isinstance(command, PromoteCommand) and self.state == "SHADOWING":
            return self._switch()
        if isinstance(command, AbortCommand) and command.version == self.version and self.state in {
                "DOWNLOADING", "VERIFYING", "STAGED", "SHADOWING"}:
            return [self._go("REJECTED", "abort", command.reason)]
        if isinstance(command, RollbackCommand):
            verify_command(command, self.trust)  # a forged one would raise here
            if command.command_id in self.seen_rollbacks:
                return [self._go(self.state, "rollback_refused", "replay", update_id=command.command_id)]
            self.seen_rollbacks.add(command.command_id)
            self.update_id, self.version = command.command_id, command.to_version
            out = [self._go("ROLLING_BACK", "rollback")]
            self.active = command.to_version
            return out + [self._go("ROLLED_BACK", "switched")]
        return []

    def tick(self) -> list:
        if not self.responsive or self.state != "SHADOWING":
            return []
        n = self.window_frames
        b, c = round(n * self.candidate_only), round(n * self.active_only)
        active_right = round(n * self.active_right)
        report = ShadowReport(device_id=self.device_id, update_id=self.update_id, active_version=self.active,
                              candidate_version=self.version, window=self.window, frames_compared=n,
                              frames_dropped=0, agreement=self.agreement, confident_agreement=self.agreement,
                              corrected_frames=n, active_accuracy=active_right / n,
                              candidate_accuracy=(active_right - c + b) / n, candidate_only_correct=b,
                              active_only_correct=c, candidate_latency_ms_p99=20.0,
                              active_latency_ms_p99=18.0)
        self.window += 1
        if not self.holds_now:  # an agent that promotes itself after its first window
            return [report, *self._switch()]
        return [report]


class Sim:
    def __init__(self, tmp_path, agents: dict[str, dict] | int = 5, *, waves=WAVES, gates=GATES, **policy) -> None:
        self.clock = Clock()
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{tmp_path / 'rollouts.db'}",
                                    connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(self.engine, "connect")
        def _fast(dbapi_connection, _record):  # the same locking as production (WAL), minus the fsyncs
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA synchronous=OFF")
            dbapi_connection.execute("PRAGMA busy_timeout=30000")

        Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.key = generate_private_key()
        self.trust = TrustStore([self.key.public_key()])
        self.bus = Bus()
        self.policy = RolloutPolicy(waves=waves, gates=gates, device_timeout_seconds=60, resend_seconds=10,
                                    lease_seconds=30, **policy)
        if isinstance(agents, int):
            agents = {f"cam-{i}": {} for i in range(1, agents + 1)}
        self.agents = {name: SimAgent(name, trust=self.trust, **kw) for name, kw in agents.items()}
        with self.sessions() as session:
            for version in (1, 2):
                session.add(ModelVersion(version=version, name="detector", status="production",
                                         bundle_key=f"models/{version}/bundle.tar", bundle_sha256="ab" * 32,
                                         bundle_size=1000 + version))
            for agent in self.agents.values():
                session.add(Device(id=agent.device_id, online=True, active_version=agent.active,
                                   update_state=agent.state if agent.active else ""))
            session.commit()
        self.ingest = IngestService(self.sessions, None, [], ImageLimits(max_bytes=1 << 20, max_side=4096), 1000,
                                    on_threshold=lambda n: None)
        self.controller = self.make_controller()

    def make_controller(self, owner: str | None = None) -> RolloutController:
        controller = RolloutController(self.sessions, FakeStore(), lambda: self.bus, self.key, self.policy,
                                       presign_seconds=3600, clock=self.clock, owner=owner)
        self.ingest.rollouts = controller
        return controller

    def deliver(self, message) -> None:
        self.ingest.handle(device_topic(message.device_id, channel_of(message)), encode_message(message))

    def create(self, **body) -> int:
        with self.sessions() as session:
            rollout = api.create_rollout(session, RolloutCreate(version=2, **body), self.policy, actor="op")
            return rollout.id

    def act(self, rollout_id: int, action: str) -> None:
        with self.sessions() as session:
            api.act(session, rollout_id, action, actor="op", reason="test")

    def step(self, controller: RolloutController | None = None) -> None:
        (controller or self.controller).reconcile_all()
        for device_id, command in self.bus.take():
            for message in self.agents[device_id].on_command(command):
                self.deliver(message)
        for agent in self.agents.values():
            for message in agent.tick():
                self.deliver(message)
        self.clock.now += STEP

    def view(self, rollout_id: int) -> dict:
        with self.sessions() as session:
            return api.rollout_dict(session, session.get(Rollout, rollout_id), now=self.clock.now)

    def run_until(self, rollout_id: int, predicate, steps: int = 60, **kw) -> dict:
        for _ in range(steps):
            view = self.view(rollout_id)
            if predicate(view):
                return view
            self.step(**kw)
        raise AssertionError(f"not reached after {steps} steps: {self.view(rollout_id)}")

    def commands(self, kind: str) -> list[RolloutCommand]:
        with self.sessions() as session:
            return list(session.scalars(select(RolloutCommand).where(RolloutCommand.kind == kind)))


def _settled(state: str):
    return lambda v: v["state"] == state and v["settled"]


def test_good_candidate_reaches_every_device_wave_by_wave(tmp_path):
    sim = Sim(tmp_path, 5)
    rid = sim.create()
    view = sim.run_until(rid, lambda v: v["state"] == "succeeded")
    assert [w["state"] for w in view["waves"]] == ["passed"] * 3
    assert [len(w["devices"]) for w in view["waves"]] == [1, 2, 2]  # canary, 50% of 5 -> 3 in all, the rest
    assert view["waves"][0]["devices"][0]["device_id"] == "cam-1"  # stable, explainable order
    assert all(agent.active == 2 for agent in sim.agents.values())
    # Exactly one deploy and one promote per device, nothing else; each deploy asks the agent to hold.
    deploys = sim.bus.of(DeployCommand)
    assert sorted(c.device_id for c in deploys) == sorted(sim.agents)
    assert all(c.await_promotion and c.rollout_id == str(rid) and c.mode == "shadow_then_switch"
               for c in deploys)
    assert len(sim.bus.of(PromoteCommand)) == 5
    assert not sim.bus.of(AbortCommand) and not sim.bus.of(RollbackCommand)
    canary_gates = {g["name"]: g for g in view["waves"][0]["gates"]}
    assert canary_gates["min_agreement"]["value"] == pytest.approx(0.98) and canary_gates["min_agreement"]["passed"]
    assert canary_gates["min_frames"]["value"] >= 100
    assert canary_gates["max_install_failure_rate"]["value"] == 0
    # Each wave promoted only after its shadow time: no promote before min_shadow_seconds.
    with sim.sessions() as session:
        actions = [a.action for a in session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
        deployments = session.scalar(select(func.count()).select_from(Deployment))
    assert actions[0] == "rollout.create" and actions.count("rollout.wave_pass") == 3
    assert deployments == 5  # listed under /deployments, state kept by ingest
    assert metrics.ROLLOUT_WAVE_STATE.labels(rollout=str(rid), wave="all", state="passed")._value.get() == 1


def test_bad_candidate_stops_at_the_canary_which_keeps_its_model(tmp_path):
    agents = {f"cam-{i}": {"agreement": 0.3} for i in range(1, 5)}
    sim = Sim(tmp_path, agents)
    rid = sim.create()
    view = sim.run_until(rid, lambda v: v["state"] == "paused" and v["waves"][0]["devices"][0]["state"] == "aborted")
    canary = view["waves"][0]
    assert canary["state"] == "failed" and "min_agreement: 0.3 against 0.9" in canary["reason"]
    assert "wave canary failed its gates" in view["reason"]
    assert [w["state"] for w in view["waves"][1:]] == ["pending", "pending"]
    # Only the canary was ever sent anything; nobody ever switched.
    assert {d for d, _ in sim.bus.sent} == {"cam-1"}
    assert not sim.bus.of(PromoteCommand)
    assert len(sim.bus.of(AbortCommand)) == 1
    assert all(agent.served == {1} and agent.active == 1 for agent in sim.agents.values())
    # A few more passes change nothing (idempotent): no new commands while paused.
    sent = len(sim.bus.sent)
    for _ in range(5):
        sim.step()
    assert len(sim.bus.sent) == sent


def test_a_canary_that_switched_by_itself_is_rolled_back_with_a_signed_command(tmp_path):
    sim = Sim(tmp_path, {"cam-1": {"agreement": 0.2, "holds": False}, "cam-2": {}}, )
    rid = sim.create(on_failure="abort")
    view = sim.run_until(rid, _settled("aborted"))
    assert view["waves"][0]["devices"][0]["state"] == "rolled_back"
    rollbacks = sim.bus.of(RollbackCommand)
    assert len(rollbacks) == 1 and rollbacks[0].to_version == 1 and rollbacks[0].bundle_url.endswith("1/bundle.tar")
    assert sim.agents["cam-1"].served == {1, 2} and sim.agents["cam-1"].active == 1
    assert sim.agents["cam-2"].served == {1} and not sim.bus.of(DeployCommand, "cam-2")


def test_install_failures_within_the_rate_let_the_wave_pass(tmp_path):
    agents = {"cam-1": {}, "cam-2": {"responsive": False}, "cam-3": {}, "cam-4": {}}
    strict = Sim(tmp_path / "strict", agents, waves=[WaveSpec(name="all", percent=100)])
    rid = strict.create()
    view = strict.run_until(rid, lambda v: v["state"] == "paused")
    assert "max_install_failure_rate: 0.25 against 0" in view["waves"][0]["reason"]
    dead = next(d for d in view["waves"][0]["devices"] if d["device_id"] == "cam-2")
    assert dead["failure"].startswith("no progress for 60 s")
    # The others were holding in shadow, never switched, and are aborted now.
    assert {d["state"] for d in view["waves"][0]["devices"] if d["device_id"] != "cam-2"} <= {"aborting", "aborted"}

    lenient = Sim(tmp_path / "lenient", agents, waves=[WaveSpec(name="all", percent=100)])
    rid = lenient.create(gates={"max_install_failure_rate": 0.25})
    view = lenient.run_until(rid, lambda v: v["state"] == "succeeded")
    states = {d["device_id"]: d["state"] for d in view["waves"][0]["devices"]}
    assert states["cam-2"] in {"aborting", "aborted"} and states["cam-1"] == states["cam-3"] == "active"


def test_an_unanswered_command_is_sent_again_with_the_same_id(tmp_path):
    sim = Sim(tmp_path, 1, waves=[WaveSpec(name="all", percent=100)])
    sim.bus.lose["cam-1"] = 1  # the first deploy never arrives
    rid = sim.create()
    sim.run_until(rid, lambda v: v["state"] == "succeeded")
    deploys = sim.bus.of(DeployCommand)
    assert len(deploys) == 2 and deploys[0].command_id == deploys[1].command_id
    assert deploys[0] == deploys[1]
    assert [c.sends for c in sim.commands("deploy")] == [2]


def test_restart_mid_wave_resumes_where_it_was(tmp_path):
    sim = Sim(tmp_path, 4)
    rid = sim.create()
    sim.run_until(rid, lambda v: v["current_wave"] == 1 and v["waves"][1]["phase"] == "shadow"
                  and v["waves"][1]["device_counts"].get("shadowing") == 1)
    deploys = len(sim.commands("deploy"))
    sim.controller.stop()  # a clean shutdown releases the lease
    restarted = sim.make_controller()
    view = sim.run_until(rid, lambda v: v["state"] == "succeeded", controller=restarted)
    # Nothing was issued twice: one deploy per device over both lifetimes.
    assert len(sim.commands("deploy")) == 4 > deploys
    assert sorted(c.device_id for c in sim.bus.of(DeployCommand)) == sorted(sim.agents)
    assert view["waves"][1]["attempt"] == 1


def test_a_crashed_replica_keeps_its_lease_until_it_runs_out(tmp_path):
    sim = Sim(tmp_path, 2)
    rid = sim.create()
    sim.step()  # the first controller takes the lease and dies without releasing it
    other = sim.make_controller(owner="replica-b")
    assert other.reconcile(rid) is False
    sim.clock.now += timedelta(seconds=31)
    assert other.reconcile(rid) is True
    with sim.sessions() as session:
        assert session.get(Rollout, rid).lease_owner == "replica-b"


def test_two_controllers_never_double_act(tmp_path):
    sim = Sim(tmp_path, 6)
    rid = sim.create()
    a, b = sim.make_controller("replica-a"), sim.make_controller("replica-b")
    barrier = threading.Barrier(2)

    def run(controller):
        barrier.wait()
        for _ in range(20):
            controller.reconcile_all()

    for _ in range(6):
        threads = [threading.Thread(target=run, args=(c,)) for c in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sim.step(controller=a)
    deploys = sim.commands("deploy")
    assert len(deploys) == len({c.device_id for c in deploys})
    ids = [c.command_id for _, c in sim.bus.sent]
    assert len(ids) == len(set(ids))  # every command published once, by one replica
    assert sim.view(rid)["state"] in {"running", "succeeded"}


def test_pause_holds_new_work_and_resume_carries_on(tmp_path):
    sim = Sim(tmp_path, 3)
    rid = sim.create()
    sim.run_until(rid, lambda v: v["current_wave"] == 1)
    sim.act(rid, "pause")
    sent = len(sim.bus.sent)
    for _ in range(6):
        sim.step()
    assert sim.view(rid)["state"] == "paused"
    assert not [c for c in sim.bus.sent[sent:] if isinstance(c[1], (DeployCommand, PromoteCommand))]
    sim.act(rid, "resume")
    sim.run_until(rid, lambda v: v["state"] == "succeeded")


def test_rollback_after_success_returns_every_device(tmp_path):
    sim = Sim(tmp_path, 3, waves=[WaveSpec(name="canary", count=1), WaveSpec(name="all", percent=100)])
    rid = sim.create()
    sim.run_until(rid, lambda v: v["state"] == "succeeded")
    sim.act(rid, "rollback")
    view = sim.run_until(rid, _settled("rolled_back"))
    assert all(agent.active == 1 for agent in sim.agents.values())
    assert {d["state"] for w in view["waves"] for d in w["devices"]} == {"rolled_back"}
    assert len(sim.bus.of(RollbackCommand)) == 3


def test_abort_stops_devices_in_shadow_and_keeps_switched_ones(tmp_path):
    sim = Sim(tmp_path, 3, waves=[WaveSpec(name="canary", count=1), WaveSpec(name="all", percent=100)])
    rid = sim.create()
    sim.run_until(rid, lambda v: v["current_wave"] == 1 and v["waves"][1]["device_counts"].get("shadowing") == 2)
    sim.act(rid, "abort")
    view = sim.run_until(rid, _settled("aborted"))
    states = {d["device_id"]: d["state"] for w in view["waves"] for d in w["devices"]}
    assert states == {"cam-1": "active", "cam-2": "aborted", "cam-3": "aborted"}
    assert view["waves"][1]["state"] == "failed"


def test_approval_gates_every_wave(tmp_path):
    sim = Sim(tmp_path, 2, waves=[WaveSpec(name="canary", count=1), WaveSpec(name="all", percent=100)])
    rid = sim.create(require_approval=True)
    for _ in range(3):
        sim.step()
    assert sim.view(rid)["state"] == "awaiting_approval" and not sim.bus.sent
    sim.act(rid, "approve")
    view = sim.run_until(rid, lambda v: v["state"] == "awaiting_approval" and v["current_wave"] == 1)
    assert "wave canary passed" in view["reason"] and not sim.bus.of(DeployCommand, "cam-2")
    sim.act(rid, "approve")
    sim.run_until(rid, lambda v: v["state"] == "succeeded")


def test_a_device_that_comes_online_during_the_last_wave_is_included(tmp_path):
    sim = Sim(tmp_path, 3, waves=[WaveSpec(name="canary", count=1), WaveSpec(name="all", percent=100)])
    with sim.sessions() as session:
        session.get(Device, "cam-3").online = False
        session.commit()
    rid = sim.create()
    sim.run_until(rid, lambda v: v["current_wave"] == 1 and v["waves"][1]["device_counts"].get("shadowing") == 1)
    with sim.sessions() as session:
        session.get(Device, "cam-3").online = True
        session.commit()
    view = sim.run_until(rid, lambda v: v["state"] == "succeeded")
    assert sorted(d["device_id"] for d in view["waves"][1]["devices"]) == ["cam-2", "cam-3"]
    assert sim.agents["cam-3"].active == 2


def test_a_running_wave_looks_for_joining_devices_every_top_up_seconds_not_every_pass(tmp_path):
    sim = Sim(tmp_path, 3, waves=[WaveSpec(name="all", percent=100)], top_up_seconds=30)
    with sim.sessions() as session:
        session.get(Device, "cam-3").online = False
        session.commit()
    rid = sim.create()
    sim.step()  # the wave starts: cam-1 and cam-2 join, cam-3 is offline
    with sim.sessions() as session:
        session.get(Device, "cam-3").online = True
        session.commit()
    joined_at = None
    for n in range(12):  # 5 s a step
        sim.controller.reconcile_all()
        if joined_at is None and any(d["device_id"] == "cam-3" for d in sim.view(rid)["waves"][0]["devices"]):
            joined_at = n
        sim.clock.now += STEP
    # Not on the next pass (it looked 5 s ago), but once 30 s have passed since the wave's look.
    assert joined_at is not None and 4 <= joined_at <= 6


def test_resume_after_a_failed_wave_runs_it_again_with_new_commands(tmp_path):
    sim = Sim(tmp_path, {"cam-1": {"agreement": 0.5}, "cam-2": {}},
              waves=[WaveSpec(name="canary", count=1), WaveSpec(name="all", percent=100)])
    rid = sim.create()
    sim.run_until(rid, lambda v: v["state"] == "paused" and v["waves"][0]["devices"][0]["state"] == "aborted")
    sim.agents["cam-1"].agreement = 0.99  # e.g. the line's lighting was fixed
    sim.act(rid, "resume")
    view = sim.run_until(rid, lambda v: v["state"] == "succeeded")
    assert view["waves"][0]["attempt"] == 2
    first, second = sim.bus.of(DeployCommand, "cam-1")
    assert first.command_id != second.command_id


def test_a_rollout_needs_a_deployable_version_and_one_at_a_time(tmp_path):
    sim = Sim(tmp_path, 1)
    with sim.sessions() as session:
        with pytest.raises(api.RolloutError, match="model version 9 does not exist") as missing:
            api.create_rollout(session, RolloutCreate(version=9), sim.policy, actor="op")
        assert missing.value.status == 404
    first = sim.create()
    with sim.sessions() as session:
        with pytest.raises(api.RolloutError, match=f"rollout {first} .* is still pending") as busy:
            api.create_rollout(session, RolloutCreate(version=2), sim.policy, actor="op")
        assert busy.value.status == 409
        with pytest.raises(api.RolloutError, match="cannot approve a rollout that is pending"):
            api.act(session, first, "approve", actor="op")
        # auto-deploy supersedes: the older rollout is aborted
        rollout = api.create_rollout(session, RolloutCreate(version=2), sim.policy, actor="auto", supersede=True)
        assert session.get(Rollout, first).state == "aborted" and rollout.state == "pending"


# Offline devices, or devices still finishing another update (a direct deploy switching: CHECKING),
# are not available: the wave waits for them rather than passing with no device as a success.
@pytest.mark.parametrize("column, away, back", [("online", False, True), ("update_state", "CHECKING", "ACTIVE")])
def test_a_wave_whose_devices_are_unavailable_waits_for_them(tmp_path, column, away, back):
    sim = Sim(tmp_path, 2, waves=[WaveSpec(name="canary", count=1), WaveSpec(name="all", percent=100)])

    def set_all(value) -> None:
        with sim.sessions() as session:
            for device in session.scalars(select(Device)):
                setattr(device, column, value)
            session.commit()

    set_all(away)
    rid = sim.create()
    for _ in range(4):
        sim.step()
    view = sim.view(rid)
    assert view["state"] == "running" and view["waves"][0]["state"] == "running"
    assert view["waves"][0]["reason"] == "waiting for 1 matching device(s) to come online or finish an update"
    assert not sim.bus.sent
    set_all(back)
    view = sim.run_until(rid, lambda v: v["state"] == "succeeded")
    assert sorted(d["device_id"] for w in view["waves"] for d in w["devices"]) == ["cam-1", "cam-2"]
    assert all(agent.active == 2 for agent in sim.agents.values())



def test_each_pass_leaves_the_running_wave_s_verdict_for_the_views(tmp_path):
    sim = Sim(tmp_path, 5)
    rid = sim.create()
    sim.run_until(rid, lambda v: v["current_wave"] == 1 and v["waves"][1]["phase"] == "shadow")
    sim.controller.reconcile_all()  # a pass over the wave as it stands now
    with sim.sessions() as session:
        rollout = session.get(Rollout, rid)
        judged = api.rollout_dict(session, rollout, devices=False, now=sim.clock.now)
        shown = api.rollout_dict(session, rollout, devices=False, now=sim.clock.now,
                                 live=sim.controller.live_verdicts)
    assert shown["waves"][1]["verdict_at"] == sim.clock.now  # the pass's, not judged again
    assert shown == judged  # what the controller decided on is what the view would decide


def test_the_running_wave_s_reports_are_read_before_the_lease_and_only_by_its_holder(tmp_path, monkeypatch):
    sim = Sim(tmp_path, 5)
    rid = sim.create()
    sim.run_until(rid, lambda v: v["current_wave"] == 1 and v["waves"][1]["phase"] == "shadow"
                  and v["waves"][1]["gates"] and any(d["shadow"] for d in v["waves"][1]["devices"]))
    holder = sim.controller
    standby = RolloutController(sim.sessions, FakeStore(), lambda: sim.bus, sim.key, sim.policy,
                                presign_seconds=3600, clock=sim.clock, owner="replica-standby")
    at_acquire = []
    real = RolloutController._acquire

    def spy(self, session, rollout_id, now):
        at_acquire.append((self.owner, set(self.shadow_cache._entries)))
        return real(self, session, rollout_id, now)

    monkeypatch.setattr(RolloutController, "_acquire", spy)
    holder.shadow_cache = type(holder.shadow_cache)()  # as after a restart: nothing read yet
    holder.reconcile_all()
    standby.reconcile_all()
    with sim.sessions() as session:
        wave = {d.device_id: d.deploy_command_id for d in session.scalars(
            select(RolloutDevice).where(RolloutDevice.rollout_id == rid, RolloutDevice.wave == 1))}
    # The holder had the running wave's reports before it took the lease; the standby read nothing.
    assert at_acquire[0] == (holder.owner, set(wave.values()))
    assert at_acquire[1] == ("replica-standby", set())


def test_a_wave_too_large_for_the_report_rate_is_asked_for_longer_windows(tmp_path):
    sim = Sim(tmp_path, 5, max_shadow_reports_per_second=0.1)
    with sim.sessions() as session:
        session.get(Device, "cam-2").last_heartbeat = {"fps": 5.0}  # the others have not said: 20 fps assumed
        session.commit()
    rid = sim.create()
    sim.run_until(rid, lambda v: v["state"] == "succeeded")
    frames = {c.device_id: c.shadow_frames for c in sim.bus.of(DeployCommand)}
    # canary: 1 device; half: 2 of 5; all: the other 2. At most 0.1 report/s per wave in all.
    assert frames == {"cam-1": 200, "cam-2": 100, "cam-3": 400, "cam-4": 400, "cam-5": 400}


def test_a_device_that_does_not_answer_is_sent_its_command_again_less_and_less_often(tmp_path):
    sim = Sim(tmp_path, {"cam-1": {"responsive": False}}, waves=[WaveSpec(name="all", percent=100)])
    rid = sim.create()
    sent_at = []
    for _ in range(11):  # 55 s, inside the 60 s device timeout; resend_seconds is 10
        before = len(sim.bus.of(DeployCommand))
        sim.step()
        if len(sim.bus.of(DeployCommand)) > before:
            sent_at.append(sim.clock.now - STEP)
    gaps = [(b - a).total_seconds() for a, b in zip(sent_at, sent_at[1:], strict=False)]
    assert gaps == [10, 20]  # then 40 s: the third resend would come after the timeout
    assert sim.view(rid)["waves"][0]["devices"][0]["failure"] is None


def test_a_deploy_the_device_s_heartbeat_shows_staged_is_not_sent_again(tmp_path):
    # The device got the deploy and shadows, but the server has not read its update events yet (a
    # large wave's backlog): its heartbeat already carries the candidate, so no resend adds to it.
    sim = Sim(tmp_path, {"cam-1": {"responsive": False}}, waves=[WaveSpec(name="all", percent=100)])
    sim.create()
    sim.step()
    with sim.sessions() as session:
        session.get(Device, "cam-1").candidate_version = 2  # what write_heartbeats records
        session.commit()
    for _ in range(8):  # 40 s; resend_seconds is 10
        sim.step()
    assert len(sim.bus.of(DeployCommand)) == 1
