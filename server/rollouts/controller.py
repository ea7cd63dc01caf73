"""The rollout controller: an idempotent reconciler.

Every pass, for each rollout that still has work, it reads the rollout, its waves and devices and
their reports from the database, decides with the pure rules of plan.py and gates.py, and writes
down each command it issues (an outbox row with the exact payload, and the command id on the
device's row) in the same transaction. Only after that commits are the commands published, one
MQTT QoS 1 message per device; paho queues them, so no device is ever waited on. A command whose
effect the device has not reported after ``resend_seconds`` is published again, byte for byte
(devices ignore a command id they already carried out). Nothing lives only in memory: a
restarted server re-reads the rows and carries on from exactly where the last pass left off.

Replicas: each pass over a rollout first takes its lease (a conditional UPDATE of the owner and
expiry on the rollout row, which is atomic on SQLite as on PostgreSQL; on PostgreSQL the row is
also taken with ``SELECT ... FOR UPDATE SKIP LOCKED``, so a replica never even waits for another
one's pass). Only the lease holder decides and publishes; another replica takes over once the
lease runs out unrenewed (a crashed holder) or is released (a clean shutdown).

Device reports reach the controller through :meth:`RolloutController.record`, which ingest calls
(on every replica) inside the transaction that writes the device's own rows, and then
:meth:`nudge`: it records a device's OTA state and shadow windows against the command ids. It
only writes columns the reconciler never writes, so the two cannot lose each other's updates.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import structlog
from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from protocol import Channel, decode_message, device_topic, encode_message
from protocol.alerts import AlertKind, Severity
from protocol.messages import AbortCommand, PromoteCommand, ShadowReport, UpdateEvent
from server import audit, metrics, registry
from server.db.models import (
    Deployment,
    Device,
    ModelVersion,
    Rollout,
    RolloutCommand,
    RolloutDevice,
    RolloutShadowReport,
    RolloutWave,
    utcnow,
)
from server.deploy import bundle_url, deploy_command, rollback_command
from server.fleet import device_query
from server.rollouts import plan
from server.rollouts.evidence import (
    LiveVerdict,
    LiveVerdicts,
    ShadowTotalsCache,
    facts,
    shadow_totals,
    wave_verdict,
)
from server.rollouts.gates import Verdict
from server.rollouts.spec import Selector

log = structlog.get_logger(__name__)

ACTOR = "rollout-controller"


@dataclass
class _Pass:
    """What one pass over one rollout did, for what happens after its commit."""

    acted: bool = False
    alerts: list[tuple[str, dict]] = field(default_factory=list)
    waves: list[tuple[str, str, list[dict]]] = field(default_factory=list)  # name, state, gates
    finished_at: datetime | None = None
    live: LiveVerdict | None = None  # the running wave's verdict, as the pass left it


class RolloutController:
    def __init__(self, sessions: sessionmaker[Session], store, bus: Callable[[], object | None], signing_key,
                 policy, *, presign_seconds: int, alerts=None, owner: str | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._sessions = sessions
        self._store = store
        self._bus = bus
        self._key = signing_key
        self.policy = policy
        self._presign = presign_seconds
        self._alerts = alerts
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exported: dict[int, datetime | None] = {}  # rollouts with Prometheus series -> finished_at
        # (rollout, wave, attempt) -> when the wave last looked for devices to join, and how many of
        # those it wanted were offline then.
        self._topped_up: dict[tuple[int, int, int], tuple[datetime, int]] = {}
        self.shadow_cache = ShadowTotalsCache()  # the gates' shadow totals (the API's views share it)
        # Each rollout's running wave's verdict after this replica's last pass (the API's views read it
        # and show its time). A large wave's passes come seconds apart; a verdict older than the lease
        # may be a dead replica's, so the view judges for itself then.
        self.live_verdicts = LiveVerdicts(max_age=max(policy.lease_seconds, 3 * policy.reconcile_seconds))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rollout-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        self.release_leases()

    def nudge(self) -> None:
        """Run a pass soon (a device reported, an operator acted)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.reconcile_all()
            except Exception:  # a database hiccup must not end the loop
                log.exception("rollout.pass_failed")
            took = time.monotonic() - started
            metrics.ROLLOUT_PASS_SECONDS.observe(took)
            self._wake.wait(self.policy.reconcile_seconds)
            self._wake.clear()
            # A burst of reports makes one pass, not one each; a long pass is followed by a longer rest.
            self._stop.wait(max(0.1, self.policy.pass_spacing * took))

    def release_leases(self) -> None:
        with self._sessions() as session:
            session.execute(update(Rollout).where(Rollout.lease_owner == self.owner)
                            .values(lease_owner="", lease_expires_at=None))
            session.commit()

    # ------------------------------------------------------------------ device reports (ingest hook)

    def observe(self, message) -> None:
        """Record one report in a transaction of its own and nudge the loop (ingest records its
        batches through :meth:`record`, in its own transaction)."""
        try:
            with self._sessions() as session:
                self.record(session, [message])
                session.commit()
        except IntegrityError:  # the same shadow report, redelivered to another replica at the same time
            pass
        except Exception:  # never let a report break ingest
            log.exception("rollout.observe_failed", device=message.device_id)
        self.nudge()

    def record(self, session: Session, messages) -> None:
        """What status, update and shadow messages mean for rollouts, in order, written in the
        caller's transaction (the caller commits, then nudges). One SELECT per table for the lot."""
        updates = [m for m in messages if isinstance(m, UpdateEvent)]
        shadows = [m for m in messages if isinstance(m, ShadowReport)]
        now = self._clock()
        if updates:
            self._record_updates(session, updates, now)
        if shadows:
            self._record_shadows(session, shadows, now)

    def _record_updates(self, session: Session, updates: list[UpdateEvent], now: datetime) -> None:
        ids = list({m.update_id for m in updates})
        by_command: dict[str, RolloutDevice] = {}
        for dev in session.scalars(select(RolloutDevice).where(or_(
                RolloutDevice.deploy_command_id.in_(ids), RolloutDevice.rollback_command_id.in_(ids)))):
            for command_id in (dev.deploy_command_id, dev.rollback_command_id):
                if command_id:
                    by_command[command_id] = dev
        for m in updates:
            dev = by_command.get(m.update_id)
            if dev is not None and dev.device_id == m.device_id:
                self._record_update(dev, m, now)

    @staticmethod
    def _record_update(dev: RolloutDevice, m: UpdateEvent, now: datetime) -> None:
        if m.update_id == dev.rollback_command_id:
            if m.event == "rollback_refused":
                dev.reason = m.reason  # sent again while the device still runs the candidate
            else:
                dev.rollback_state = m.to_state
                dev.reason = m.reason
        else:
            dev.update_state = m.to_state
            dev.reason = m.reason
            if m.to_state == "SHADOWING" and dev.shadow_started_at is None:
                dev.shadow_started_at = now
        dev.progress_at = dev.updated_at = now

    @staticmethod
    def _record_shadows(session: Session, shadows: list[ShadowReport], now: datetime) -> None:
        # Shadow windows are most of what a wave sends (one per device every few seconds): plain
        # rows, one multi-row INSERT and one UPDATE per batch, no ORM object per report.
        ids = list({m.update_id for m in shadows})
        owners = {command: (dev_id, rollout_id, device_id) for dev_id, rollout_id, device_id, command in
                  session.execute(select(RolloutDevice.id, RolloutDevice.rollout_id, RolloutDevice.device_id,
                                         RolloutDevice.deploy_command_id)
                                  .where(RolloutDevice.deploy_command_id.in_(ids)))}
        stored = set(session.scalars(select(RolloutShadowReport.msg_id).where(
            RolloutShadowReport.msg_id.in_([m.msg_id for m in shadows]))))
        rows, touched = [], set()
        for m in shadows:
            owner = owners.get(m.update_id)
            if owner is None or owner[2] != m.device_id or m.msg_id in stored:
                continue
            stored.add(m.msg_id)
            touched.add(owner[0])
            rows.append(dict(
                msg_id=m.msg_id, rollout_id=owner[1], device_id=m.device_id, deploy_command_id=m.update_id,
                received_at=now, window=m.window, frames=m.frames_compared, frames_dropped=m.frames_dropped,
                frames_skipped_budget=m.frames_skipped_budget, agreement=m.agreement,
                confident_agreement=m.confident_agreement,
                corrected_frames=m.corrected_frames, active_accuracy=m.active_accuracy,
                candidate_accuracy=m.candidate_accuracy, candidate_only_correct=m.candidate_only_correct,
                active_only_correct=m.active_only_correct, active_latency_ms_p99=m.active_latency_ms_p99,
                candidate_latency_ms_p99=m.candidate_latency_ms_p99, errors=m.errors))
        if rows:
            session.execute(insert(RolloutShadowReport), rows)
            session.execute(update(RolloutDevice).where(RolloutDevice.id.in_(touched))
                            .values(progress_at=now, updated_at=now)
                            .execution_options(synchronize_session=False))

    # ------------------------------------------------------------------ reconcile

    def reconcile_all(self) -> int:
        """One pass over every rollout with work left; returns how many this replica acted on."""
        with self._sessions() as session:
            ids = session.scalars(select(Rollout.id).where(
                or_(Rollout.state.in_(plan.ACTIVE), Rollout.settled.is_(False))).order_by(Rollout.id)).all()
        acted = 0
        for rollout_id in ids:
            if self._stop.is_set():
                break
            try:
                acted += self.reconcile(rollout_id)
            except Exception:
                log.exception("rollout.reconcile_failed", rollout=rollout_id)
        self._forget_old_metrics()
        return acted

    def reconcile(self, rollout_id: int) -> bool:
        """One pass over one rollout, if this replica holds (or takes) its lease."""
        now = self._clock()
        self._read_evidence_ahead(rollout_id, now)
        with self._sessions() as session:
            if not self._acquire(session, rollout_id, now):
                return False
            rollout = session.get(Rollout, rollout_id, populate_existing=True)
            step = _Step(self, session, rollout, now)
            step.run()
            session.commit()
            done = step.outcome
            done.finished_at = rollout.finished_at if rollout.settled else None
        self._after(rollout_id, done)
        self._publish(rollout_id)
        return True

    def _read_evidence_ahead(self, rollout_id: int, now: datetime) -> None:
        """Bring the shadow totals of the running wave up to date before the pass takes the lease.

        On SQLite the pass holds the database's only write lock from its first statement to its
        commit, and every ingest commit waits for it; the reports read here (most of a pass's work
        in a large wave's shadow phase) are then no longer read under that lock, where only the few
        that arrived in between are. Skipped while another replica holds the lease."""
        with self._sessions() as session:
            ours = session.scalar(select(Rollout.id).where(Rollout.id == rollout_id, self._may_lease(now)))
            if ours is None:
                return
            running = dict(session.execute(
                select(RolloutDevice.deploy_command_id, RolloutDevice.device_id)
                .join(RolloutWave, and_(RolloutWave.rollout_id == RolloutDevice.rollout_id,
                                        RolloutWave.position == RolloutDevice.wave))
                .where(RolloutDevice.rollout_id == rollout_id, RolloutWave.state == plan.WAVE_RUNNING,
                       RolloutDevice.deploy_command_id.is_not(None))).all())
            if running:
                self.shadow_cache.totals(session, running)

    def _may_lease(self, now: datetime):
        """SQL: this replica holds the rollout's lease, or nobody does (free, or run out)."""
        return or_(Rollout.lease_owner == self.owner, Rollout.lease_owner == "",
                   Rollout.lease_expires_at.is_(None), Rollout.lease_expires_at < now)

    def _acquire(self, session: Session, rollout_id: int, now: datetime) -> bool:
        if session.get_bind().dialect.name == "postgresql":
            row = session.execute(select(Rollout.id).where(Rollout.id == rollout_id)
                                  .with_for_update(skip_locked=True)).first()
            if row is None:
                return False  # another replica is in a pass over it right now
        # First statement of the transaction on SQLite: it takes the write lock before any read.
        result = session.execute(
            update(Rollout)
            .where(Rollout.id == rollout_id, self._may_lease(now))
            .values(lease_owner=self.owner, lease_expires_at=now + timedelta(seconds=self.policy.lease_seconds))
            .execution_options(synchronize_session=False))
        if result.rowcount != 1:
            session.rollback()
            return False
        return True

    def _after(self, rollout_id: int, done: _Pass) -> None:
        self.live_verdicts.put(rollout_id, done.live)
        for name, state, gates in done.waves:
            metrics.set_wave_state(rollout_id, name, state)
            for g in gates:
                if g.get("value") is not None:
                    metrics.set_gate(rollout_id, name, g["name"], float(g["value"]), g.get("threshold"),
                                     g.get("passed"))
        self._exported[rollout_id] = done.finished_at
        if self._alerts is not None:
            for message, details in done.alerts:
                try:
                    self._alerts.raise_alert(AlertKind.ROLLOUT, Severity.CRITICAL, message,
                                             subject=f"rollout:{rollout_id}", details=details)
                except Exception:
                    log.exception("rollout.alert_failed", rollout=rollout_id)

    def _forget_old_metrics(self) -> None:
        for key in [k for k in self._topped_up if k[0] not in self._exported or self._exported[k[0]] is not None]:
            del self._topped_up[key]  # finished rollouts (or ones another replica holds now)
        cutoff = self._clock() - timedelta(seconds=self.policy.metrics_retention_seconds)
        for rollout_id, finished in list(self._exported.items()):
            if finished is not None and finished < cutoff:
                metrics.forget_rollout(rollout_id)
                del self._exported[rollout_id]

    def _publish(self, rollout_id: int) -> int:
        """Publish the rollout's commands not published yet (or due again); never waits for a device."""
        bus = self._bus()
        if bus is None:
            return 0
        sent = 0
        with self._sessions() as session:
            rows = session.scalars(select(RolloutCommand).where(
                RolloutCommand.rollout_id == rollout_id, RolloutCommand.published_at.is_(None))
                .order_by(RolloutCommand.created_at, RolloutCommand.command_id)).all()
            for row in rows:
                try:
                    command = decode_message(device_topic(row.device_id, Channel.COMMANDS), row.payload.encode())
                    bus.publish_command(row.device_id, command)
                except Exception as exc:  # broker unreachable: the next pass tries again
                    log.warning("rollout.publish_failed", command=row.command_id, device=row.device_id,
                                error=str(exc))
                    break
                row.published_at, row.sends = self._clock(), row.sends + 1
                metrics.DEPLOY_COMMANDS.labels(mode=f"rollout_{row.kind}").inc()
                sent += 1
            session.commit()
        if sent:
            log.info("rollout.published", rollout=rollout_id, commands=sent)
        return sent


def make_rollout_controller(ctx, signing_key) -> RolloutController:
    """The controller of ``create_app``'s context (the bus is read at each publish: it may come later)."""
    s = ctx.settings
    return RolloutController(ctx.sessions, ctx.store, lambda: ctx.bus, signing_key, s.rollouts,
                             presign_seconds=s.presign_seconds, alerts=ctx.alerts)


class _Step:
    """One pass over one rollout, inside its lease's transaction."""

    def __init__(self, controller: RolloutController, session: Session, rollout: Rollout, now: datetime) -> None:
        self.c = controller
        self.policy = controller.policy
        self.session = session
        self.rollout = rollout
        self.now = now
        self.outcome = _Pass()
        self.waves = list(session.scalars(select(RolloutWave).where(RolloutWave.rollout_id == rollout.id)
                                          .order_by(RolloutWave.position)))
        self.devices = list(session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)
                                            .order_by(RolloutDevice.id)))
        self._mv: ModelVersion | None = None
        self._url: str | None = None
        self._verdicts: dict[int, Verdict] = {}
        self._offline: int | None = None  # what the wave's top-up found offline in this pass
        self._live: LiveVerdict | None = None  # the last verdict this pass computed, with its wave
        self._new_commands: list[dict] = []  # rows _issue_commands writes at once
        self._new_deployments: list[dict] = []
        self._window_frames: dict[str, int] = {}  # device -> frames per shadow window, for its deploy

    # -------------------------------------------------------------- the pass

    def run(self) -> None:
        r = self.rollout
        before = (r.state, r.current_wave, [(w.state, w.phase) for w in self.waves])
        self._observe()
        if r.state == plan.PENDING:
            self._set_state(plan.AWAITING_APPROVAL if r.require_approval else plan.RUNNING)
        if r.state == plan.RUNNING:
            self._timeouts()
            self._run_wave()
        if r.state == plan.ABORTED:
            self._wind_down(plan.STOP)
        elif r.state == plan.ROLLED_BACK:
            self._wind_down(plan.REVERT)
        self._issue_commands()
        self._resend()
        self._settle()
        after = (r.state, r.current_wave, [(w.state, w.phase) for w in self.waves])
        if before != after or self.outcome.acted:
            r.updated_at = self.now
        self._export()

    def _set_state(self, state: str, reason: str | None = None) -> None:
        r = self.rollout
        log.info("rollout.state", rollout=r.id, transition=f"{r.state}->{state}", reason=reason)
        r.state = state
        if reason is not None:
            r.reason = reason[:4000]
        if state in plan.FINISHED and r.finished_at is None:
            r.finished_at = self.now
        if state == plan.SUCCEEDED:
            self._make_production()

    def _make_production(self) -> None:
        """A rollout that took a version to the whole fleet makes it production: production is what
        the fleet is meant to run (a rollout to some groups or devices leaves it as it is)."""
        r = self.rollout
        if Selector.model_validate(r.selector) != Selector():
            return
        mv = self.session.get(ModelVersion, r.version)
        if mv is None or mv.status in ("rejected", "rolled_back"):
            return
        if registry.promote(self.session, r.version, actor=ACTOR, reason=f"rollout {r.id} completed"):
            audit.record(self.session, ACTOR, "model.promote", f"version:{r.version}", "rollout",
                         reason=f"rollout {r.id} reached the whole fleet", owner=self.c.owner)
            log.info("rollout.production", rollout=r.id, version=r.version)

    def _wave_devices(self, position: int) -> list[RolloutDevice]:
        return [d for d in self.devices if d.wave == position]

    # -------------------------------------------------------------- devices

    def _observe(self) -> None:
        """Device states from what they reported; failures their reports show."""
        for dev in self.devices:
            if not dev.failure:
                failure = plan.observed_failure(facts(dev))
                if failure:
                    dev.failure = failure[:4000]
                    log.warning("rollout.device_failed", rollout=self.rollout.id, device=dev.device_id,
                                failure=failure)
            self._refresh(dev)

    def _refresh(self, dev: RolloutDevice) -> None:
        state = plan.device_state(facts(dev))
        if dev.state != state:
            dev.state, dev.updated_at = state, self.now

    def _stale(self, dev: RolloutDevice) -> bool:
        return (self.now - dev.progress_at).total_seconds() > self.policy.device_timeout_seconds

    def _timeouts(self) -> None:
        """A device making no progress counts as failed and is stopped, so it never holds its wave."""
        for dev in self._wave_devices(self.rollout.current_wave):
            if dev.goal in (plan.SHADOW, plan.SWITCH) and not dev.failure and dev.state in (
                    plan.D_PENDING, plan.D_DEPLOYING, plan.D_SHADOWING, plan.D_PROMOTING) and self._stale(dev):
                dev.failure = (f"no progress for {self.policy.device_timeout_seconds:.0f} s "
                               f"(last state {dev.update_state or 'none reported'})")
                dev.goal = plan.STOP
                dev.progress_at = self.now  # the abort gets its own time to be confirmed
                log.warning("rollout.device_timeout", rollout=self.rollout.id, device=dev.device_id)

    def _eligible(self) -> list[plan.Candidate]:
        """Devices the selector matches on an older version (or none), in no unsettled rollout (this
        one included). One in the middle of an update (a direct deploy finishing) counts as not
        available, like an offline one: the wave waits for it rather than passing without it.
        Filtered in SQL and read as four columns: this runs over the whole fleet."""
        r = self.rollout
        sel = Selector.model_validate(r.selector)
        query = device_query(groups=sel.groups, tags=sel.tags, gpu_compute_capability=sel.gpu_compute_capability,
                             tensorrt_version=sel.tensorrt_version, revoked=False)
        if sel.devices:
            query = query.where(Device.id.in_(sel.devices))
        busy = (select(RolloutDevice.device_id).join(Rollout, Rollout.id == RolloutDevice.rollout_id)
                .where(Rollout.settled.is_(False)))
        query = query.where(
            Device.id.not_in(busy), or_(Device.active_version.is_(None), Device.active_version < r.version),
        ).with_only_columns(Device.id, Device.online, Device.active_version, Device.update_state)
        return [plan.Candidate(device_id, bool(online) and (state or "") in plan.RESTING_UPDATE_STATES, active)
                for device_id, online, active, state in self.session.execute(query)]

    def _top_up(self, wave: RolloutWave) -> int:
        """Bring the wave to its size: at its start, and as devices enroll or come online. Returns
        how many of the devices it still wants are offline (it may wait for them if it has none)."""
        offline = self._look_for_devices(wave)
        self.c._topped_up[(self.rollout.id, wave.position, wave.attempt)] = (self.now, offline)
        return offline

    def _look_for_devices(self, wave: RolloutWave) -> int:
        pool = self._eligible()
        if not pool:
            return 0
        before = sum(1 for d in self.devices if d.wave < wave.position)
        in_wave = len(self._wave_devices(wave.position))
        n = plan.wave_quota(wave.percent, wave.count, len(self.devices) + len(pool), before, in_wave)
        last = wave.position == len(self.waves) - 1
        chosen = set(plan.choose(pool, n, last_wave=last))
        offline = len(plan.choose([replace(c, online=True) for c in pool], n, last_wave=last)) - len(chosen)
        if not chosen:
            return offline
        goal = plan.SHADOW if wave.phase == plan.PHASE_SHADOW else plan.SWITCH
        for candidate in pool:
            if candidate.device_id in chosen:
                dev = RolloutDevice(rollout_id=self.rollout.id, device_id=candidate.device_id, wave=wave.position,
                                    attempt=wave.attempt, goal=goal, state=plan.D_PENDING,
                                    from_version=candidate.active_version, assigned_at=self.now,
                                    progress_at=self.now, updated_at=self.now)
                self.session.add(dev)
                self.devices.append(dev)
        wave.target = in_wave + len(chosen)
        self.outcome.acted = True
        log.info("rollout.devices_joined", rollout=self.rollout.id, wave=wave.name, devices=sorted(chosen))
        return offline

    # -------------------------------------------------------------- waves

    def _first_phase(self) -> str:
        return plan.PHASE_SHADOW if self.rollout.mode == "shadow_then_switch" else plan.PHASE_SWITCH

    def _start_wave(self, wave: RolloutWave) -> None:
        wave.state, wave.phase, wave.started_at = plan.WAVE_RUNNING, self._first_phase(), self.now
        wave.reason, wave.gate_results = "", []
        self._offline = self._top_up(wave)
        audit.record(self.session, ACTOR, "rollout.wave_start", f"rollout:{self.rollout.id}",
                     wave=wave.name, devices=[d.device_id for d in self._wave_devices(wave.position)],
                     attempt=wave.attempt, owner=self.c.owner)

    def _retry_wave(self, wave: RolloutWave) -> None:
        """An operator resumed after the wave failed: once its devices are back, it runs again."""
        devices = self._wave_devices(wave.position)
        if not all(plan.settled(facts(d)) or (d.failure and self._stale(d)) for d in devices):
            return
        wave.attempt += 1
        current = {d.id: d.active_version for d in self.session.scalars(
            select(Device).where(Device.id.in_([d.device_id for d in devices])))}
        for dev in devices:
            dev.attempt, dev.goal, dev.failure, dev.reason = wave.attempt, plan.SHADOW, "", ""
            if self._first_phase() == plan.PHASE_SWITCH:
                dev.goal = plan.SWITCH
            dev.update_state = dev.rollback_state = ""
            dev.deploy_command_id = dev.promote_command_id = dev.abort_command_id = dev.rollback_command_id = None
            dev.shadow_started_at = None
            dev.from_version = current.get(dev.device_id, dev.from_version)
            dev.progress_at = dev.updated_at = self.now
            self._refresh(dev)
        self._start_wave(wave)

    def _run_wave(self) -> None:
        r = self.rollout
        if r.current_wave >= len(self.waves):
            self._set_state(plan.SUCCEEDED, "every wave passed")
            return
        wave = self.waves[r.current_wave]
        self._offline = None
        if wave.state == plan.WAVE_PENDING:
            self._start_wave(wave)
        elif wave.state == plan.WAVE_FAILED:
            self._retry_wave(wave)
        if wave.state != plan.WAVE_RUNNING:
            return
        offline = self._offline  # what the wave's start found, if it started in this pass
        if offline is None:
            last = self.c._topped_up.get((r.id, wave.position, wave.attempt))
            if last is None or (self.now - last[0]).total_seconds() >= self.policy.top_up_seconds:
                offline = self._top_up(wave)
            else:
                offline = last[1]
        devices = self._wave_devices(wave.position)
        if not devices and offline:
            # The devices it should take are offline: an empty wave must not pass for a judged one.
            wave.reason = f"waiting for {offline} matching device(s) to come online or finish an update"
            return
        if wave.reason.startswith("waiting for"):
            wave.reason = ""
        verdict = wave_verdict(r, wave, devices, shadow_totals(self.session, devices, self.c.shadow_cache), self.now)
        self._verdicts[wave.position] = verdict
        self._live = LiveVerdict(wave.position, wave.attempt, wave.phase, verdict, self.now)
        if verdict.outcome == "fail":
            self._fail_wave(wave, verdict)
        elif verdict.outcome == "undecided":
            # Not evidence against the candidate: the wave pauses whatever on_failure says, and an
            # operator's resume runs it again (or they roll out with on_no_evidence="pass").
            self._fail_wave(wave, verdict, undecided=True)
        elif verdict.outcome == "pass" and wave.phase == plan.PHASE_SHADOW:
            wave.phase = plan.PHASE_SWITCH
            wave.gate_results = [g.as_dict() for g in verdict.gates]
            for dev in devices:
                if not dev.failure:
                    dev.goal = plan.SWITCH
            audit.record(self.session, ACTOR, "rollout.wave_promote", f"rollout:{r.id}", wave=wave.name,
                         verdict=verdict.reason, gates=wave.gate_results, owner=self.c.owner)
            log.info("rollout.wave_promote", rollout=r.id, wave=wave.name, reason=verdict.reason)
        elif verdict.outcome == "pass":
            self._pass_wave(wave, verdict)

    def _pass_wave(self, wave: RolloutWave, verdict: Verdict) -> None:
        r = self.rollout
        wave.state, wave.finished_at, wave.reason = plan.WAVE_PASSED, self.now, verdict.reason
        switch = [g.as_dict() for g in verdict.gates]
        names = {g["name"] for g in switch}
        wave.gate_results = [g for g in wave.gate_results if g["name"] not in names] + switch
        audit.record(self.session, ACTOR, "rollout.wave_pass", f"rollout:{r.id}", wave=wave.name,
                     verdict=verdict.reason, owner=self.c.owner)
        log.info("rollout.wave_pass", rollout=r.id, wave=wave.name, reason=verdict.reason)
        r.current_wave += 1
        if r.current_wave >= len(self.waves):
            self._set_state(plan.SUCCEEDED, f"every wave passed (last: {wave.name}: {verdict.reason})")
            return
        following = self.waves[r.current_wave]
        if r.require_approval:
            self._set_state(plan.AWAITING_APPROVAL,
                            f"wave {wave.name} passed; waiting for approval to start wave {following.name}")
            return
        self._start_wave(following)
        self._run_wave()

    def _fail_wave(self, wave: RolloutWave, verdict: Verdict, undecided: bool = False) -> None:
        r = self.rollout
        wave.state, wave.finished_at, wave.reason = plan.WAVE_FAILED, self.now, verdict.reason
        wave.gate_results = ([g for g in wave.gate_results if g["name"] not in {x.name for x in verdict.gates}]
                             + [g.as_dict() for g in verdict.gates])
        for dev in self._wave_devices(wave.position):
            dev.goal = plan.REVERT
        state = plan.PAUSED if r.on_failure == "pause" or undecided else plan.ABORTED
        reason = (f"wave {wave.name} paused: {verdict.reason}" if undecided
                  else f"wave {wave.name} failed its gates: {verdict.reason}")
        self._set_state(state, reason)
        audit.record(self.session, ACTOR, "rollout.wave_fail", f"rollout:{r.id}", wave=wave.name,
                     verdict=verdict.reason, gates=wave.gate_results, then=state, owner=self.c.owner)
        self.outcome.alerts.append((
            f"rollout {r.id} of version {r.version}: {reason}; its devices go back to their previous "
            f"version, the rollout is {state}", {"rollout": r.id, "version": r.version, "wave": wave.name,
                                                   "gates": wave.gate_results}))

    def _wind_down(self, goal: str) -> None:
        """Aborted: nothing new starts serving. Rolled back: every device goes back."""
        for dev in self.devices:
            if goal == plan.REVERT and dev.goal != plan.REVERT:
                dev.goal = plan.REVERT
            elif goal == plan.STOP and dev.goal in (plan.SHADOW, plan.SWITCH):
                dev.goal = plan.STOP
        for wave in self.waves:
            if wave.state == plan.WAVE_RUNNING:
                wave.state, wave.finished_at = plan.WAVE_FAILED, self.now
                wave.reason = self.rollout.reason or f"rollout {self.rollout.state}"

    # -------------------------------------------------------------- commands

    def _version(self) -> ModelVersion:
        if self._mv is None:
            self._mv = self.session.get(ModelVersion, self.rollout.version)
            self._url, _ = bundle_url(self.c._store, self._mv, self.c._presign)
        return self._mv

    def _issue_commands(self) -> None:
        running = self.rollout.state == plan.RUNNING
        due = [(dev, kind) for dev in self.devices if (kind := plan.next_command(facts(dev))) is not None
               and not (kind in (plan.DEPLOY, plan.PROMOTE) and not running)]
        self._window_frames = self._shadow_windows([dev for dev, kind in due if kind == plan.DEPLOY])
        for dev, kind in due:
            self._issue(dev, kind)
        # A wave's start issues a command per device: plain multi-row INSERTs, not an ORM object each,
        # so that a 10,000-device wave holds the database's write lock for as short a time as it can.
        if self._new_commands:
            self.session.execute(insert(RolloutCommand), self._new_commands)
            kinds = Counter(row["kind"] for row in self._new_commands)
            log.info("rollout.commands", rollout=self.rollout.id, **kinds)
        if self._new_deployments:
            self.session.execute(insert(Deployment), self._new_deployments)
        self._new_commands, self._new_deployments = [], []

    def _shadow_windows(self, deploying: list[RolloutDevice]) -> dict[str, int]:
        """Frames per shadow window for each device about to be deployed: the rollout's, longer in a
        wave large enough that the devices' reports together would exceed the policy's rate."""
        if not deploying:
            return {}
        fps: dict[str, float | None] = {}
        ids = [dev.device_id for dev in deploying]
        for start in range(0, len(ids), 500):
            for device_id, heartbeat in self.session.execute(
                    select(Device.id, Device.last_heartbeat).where(Device.id.in_(ids[start:start + 500]))):
                value = (heartbeat or {}).get("fps")
                fps[device_id] = float(value) if isinstance(value, int | float) else None
        sizes = Counter(dev.wave for dev in self.devices)
        return {dev.device_id: plan.shadow_window_frames(self.rollout.shadow_frames, sizes[dev.wave],
                                                         fps.get(dev.device_id),
                                                         self.policy.max_shadow_reports_per_second)
                for dev in deploying}

    def _issue(self, dev: RolloutDevice, kind: str) -> None:
        r = self.rollout
        reason = r.reason or f"rollout {r.id}"
        deployment_mode = None
        if kind == plan.DEPLOY:
            mv = self._version()
            frames = self._window_frames.get(dev.device_id, r.shadow_frames)
            command = deploy_command(dev.device_id, mv, self._url, mode=r.mode, shadow_frames=frames,
                                     rollout_id=str(r.id), await_promotion=r.mode == "shadow_then_switch")
            dev.deploy_command_id, deployment_mode = command.command_id, r.mode
        elif kind == plan.PROMOTE:
            command = PromoteCommand(device_id=dev.device_id, version=r.version)
            dev.promote_command_id = command.command_id
        elif kind == plan.ABORT:
            command = AbortCommand(device_id=dev.device_id, version=r.version, reason=reason[:2000])
            dev.abort_command_id = command.command_id
        else:
            target = self.session.get(ModelVersion, dev.from_version)
            url, expires_at = (bundle_url(self.c._store, target, self.c._presign) if target and target.bundle_key
                               else (None, self.now + timedelta(seconds=self.c._presign)))
            command = rollback_command(dev.device_id, dev.from_version, self.c._key, reason=reason,
                                       expires_at=expires_at, mv=target if url else None, url=url)
            dev.rollback_command_id, deployment_mode = command.command_id, "rollback"
        self._new_commands.append(dict(
            command_id=command.command_id, rollout_id=r.id, device_id=dev.device_id, wave=dev.wave,
            attempt=dev.attempt, kind=kind, payload=encode_message(command).decode(), created_at=self.now))
        if deployment_mode is not None:  # also listed under /deployments, its state kept by ingest
            self._new_deployments.append(dict(
                device_id=dev.device_id, command_id=command.command_id,
                version=command.version if kind == plan.DEPLOY else dev.from_version,
                mode=deployment_mode, reason=f"rollout {r.id}"))
        dev.progress_at = dev.updated_at = self.now
        self._refresh(dev)
        self.outcome.acted = True
        log.debug("rollout.command", rollout=r.id, device=dev.device_id, kind=kind, command=command.command_id)

    def _resend(self) -> None:
        """Publish again what a device has not acted on (it may have missed it; duplicates are ignored).
        Only commands due for it are read: sent long enough ago, and not sent too often already."""
        due = {row.command_id: row for row in self.session.scalars(select(RolloutCommand).where(
            RolloutCommand.rollout_id == self.rollout.id, RolloutCommand.published_at.is_not(None),
            RolloutCommand.published_at <= self.now - timedelta(seconds=self.policy.resend_seconds),
            RolloutCommand.sends < self.policy.max_sends))
            if plan.resend_due(row.sends, (self.now - row.published_at).total_seconds(), self.policy.resend_seconds)}
        if not due:
            return
        resent: Counter = Counter()
        devices = {row.device_id for row in due.values()}
        inventory = {row.id: row for row in self.session.execute(
            select(Device.id, Device.online, Device.active_version, Device.candidate_version)
            .where(Device.id.in_(devices)))}
        for dev in self.devices:
            seen = inventory.get(dev.device_id)
            if dev.device_id not in devices or seen is None or not seen.online:
                continue  # its broker session keeps what was sent; nothing to add while it is away
            f = facts(dev)
            for kind, command_id in ((plan.DEPLOY, dev.deploy_command_id), (plan.PROMOTE, dev.promote_command_id),
                                     (plan.ABORT, dev.abort_command_id), (plan.ROLLBACK, dev.rollback_command_id)):
                row = due.get(command_id) if command_id else None
                if row is None or not plan.worth_resending(kind, f) or plan.heartbeat_shows_effect(
                        kind, self.rollout.version, seen.active_version, seen.candidate_version):
                    continue
                row.published_at = None
                resent[kind] += 1
                log.debug("rollout.resend", rollout=self.rollout.id, device=dev.device_id, kind=kind,
                          sends=row.sends)
        if resent:
            log.info("rollout.resends", rollout=self.rollout.id, **resent)

    def _settle(self) -> None:
        r = self.rollout
        if r.state in plan.FINISHED and not r.settled and all(
                plan.settled(facts(d)) or self._stale(d) for d in self.devices):
            r.settled = True
            log.info("rollout.settled", rollout=r.id, state=r.state)

    # -------------------------------------------------------------- metrics

    def _export(self) -> None:
        live = self._live
        if live is not None and any((w.position, w.attempt, w.phase, w.state) ==
                                    (live.position, live.attempt, live.phase, plan.WAVE_RUNNING) for w in self.waves):
            self.outcome.live = live  # still the running wave as it was judged
        for wave in self.waves:
            verdict = self._verdicts.get(wave.position)
            gates = [g.as_dict() for g in verdict.gates] if verdict is not None else list(wave.gate_results)
            self.outcome.waves.append((wave.name, wave.state, gates))

