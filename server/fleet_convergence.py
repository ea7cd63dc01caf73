"""Keeps the devices that no rollout owns on ``production``, the version the fleet is meant to run.

A device that enrolls, or comes back online after a rollout or a fleet rollback finished, runs
something else; this sends it production (a deploy when it is behind, a signed rollback when it
is ahead). The decision is pure (:func:`convergence_actions`); :class:`FleetConvergence` reads the
database, sends through ``server.deploy`` (which records a ``deployments`` row and audits) and runs
on a timer. A command sent after production moved by anyone else (an operator's deploy, a rollout
to one group) is respected: the device is left where it was put.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server import registry
from server.db.models import Alias, Deployment, Device, Rollout, RolloutDevice, utcnow
from server.rollouts.plan import RESTING_UPDATE_STATES

log = structlog.get_logger(__name__)

# The reason every command this module sends carries: how it tells its own commands from an operator's.
REASON_PREFIX = "converge to production"
# Behind production: deploy it (shadowed first); no model yet: install it directly; ahead: roll back.
DEPLOY, INSTALL, ROLLBACK = "deploy", "install", "rollback"


@dataclass(frozen=True)
class DeviceFacts:
    device_id: str
    online: bool
    active_version: int | None
    update_state: str = ""
    owned_by_rollout: bool = False  # in a rollout that has not settled: the controller acts for it


@dataclass(frozen=True)
class CommandsSince:
    """A device's commands since production last moved."""

    ours: int = 0  # convergence commands for the current production
    last_ours_at: datetime | None = None
    operators: int = 0  # any other command (a deploy or rollback someone asked for)


@dataclass(frozen=True)
class Action:
    device_id: str
    kind: str  # DEPLOY | INSTALL | ROLLBACK
    version: int


def convergence_actions(devices: Iterable[DeviceFacts], production: int, since: dict[str, CommandsSince], *,
                        now: datetime, resend_seconds: float, max_sends: int) -> list[Action]:
    """What to send so that every free device runs ``production``: nothing to a device that is on
    it, offline, mid-update, owned by a rollout, or put elsewhere by an operator since production
    moved; the same command again only after ``resend_seconds``, at most ``max_sends`` times."""
    out = []
    for d in devices:
        if d.active_version == production or not d.online or d.owned_by_rollout:
            continue
        if (d.update_state or "") not in RESTING_UPDATE_STATES:  # as the rollout controller
            continue
        c = since.get(d.device_id, CommandsSince())
        if c.operators or c.ours >= max_sends:
            continue
        if c.last_ours_at is not None and (now - c.last_ours_at).total_seconds() < resend_seconds:
            continue
        kind = INSTALL if d.active_version is None else ROLLBACK if d.active_version > production else DEPLOY
        out.append(Action(d.device_id, kind, production))
    return out


def is_convergence(reason: str) -> bool:
    return reason.startswith(REASON_PREFIX)


class FleetConvergence:
    """Runs :func:`convergence_actions` every ``interval`` seconds and sends what it says."""

    def __init__(self, sessions: sessionmaker[Session], store, bus: Callable[[], object | None], signing_key, *,
                 presign_seconds: int, shadow_frames: int, resend_seconds: float, max_sends: int,
                 interval: float, clock: Callable[[], datetime] = utcnow) -> None:
        self._sessions, self._store, self._bus, self._key = sessions, store, bus, signing_key
        self._presign, self._shadow_frames = presign_seconds, shadow_frames
        self._resend, self._max_sends, self._interval = resend_seconds, max_sends, interval
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="fleet-convergence", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.run_once()
            except Exception:  # a database or broker hiccup must not end the loop
                log.exception("convergence.pass_failed")

    def plan(self, session: Session) -> list[Action]:
        alias = session.get(Alias, registry.PRODUCTION)
        if alias is None:
            return []
        owned = set(session.scalars(select(RolloutDevice.device_id).join(Rollout, Rollout.id == RolloutDevice.rollout_id)
                                    .where(Rollout.settled.is_(False))))
        devices = [DeviceFacts(d.id, bool(d.online), d.active_version, d.update_state or "", d.id in owned)
                   for d in session.scalars(select(Device).where(Device.revoked.is_(False)))]
        since: dict[str, CommandsSince] = {}
        for dep in session.scalars(select(Deployment).where(Deployment.created_at >= alias.updated_at)
                                   .order_by(Deployment.id)):
            c = since.get(dep.device_id, CommandsSince())
            if is_convergence(dep.reason) and dep.version == alias.version:
                c = CommandsSince(c.ours + 1, dep.created_at, c.operators)
            elif not is_convergence(dep.reason):  # an operator's deploy, or a rollout's (e.g. to one group)
                c = CommandsSince(c.ours, c.last_ours_at, c.operators + 1)
            since[dep.device_id] = c
        return convergence_actions(devices, alias.version, since, now=self._clock(),
                                   resend_seconds=self._resend, max_sends=self._max_sends)

    def run_once(self) -> list[Action]:
        """One pass: plan and send. Returns what was sent."""
        from server.deploy import deploy_version, rollback_version

        bus = self._bus()
        if bus is None:
            return []
        with self._sessions() as session:
            actions = self.plan(session)
            if not actions:
                return []
            version = actions[0].version
            reason = f"{REASON_PREFIX} v{version}"
            rollbacks = [a.device_id for a in actions if a.kind == ROLLBACK]
            for kind, mode in ((DEPLOY, "shadow_then_switch"), (INSTALL, "direct")):
                devices = [a.device_id for a in actions if a.kind == kind]
                if devices:
                    deploy_version(session, self._store, bus, version, devices, mode=mode,
                                   shadow_frames=self._shadow_frames, presign_seconds=self._presign,
                                   actor="fleet-convergence", reason=reason)
            if rollbacks:
                rollback_version(session, self._store, bus, self._key, version, rollbacks, reason=reason,
                                 presign_seconds=self._presign, actor="fleet-convergence")
        log.info("convergence.sent", version=version, devices=len(actions), rollbacks=len(rollbacks))
        return actions


def make_fleet_convergence(ctx, signing_key) -> FleetConvergence:
    s = ctx.settings
    return FleetConvergence(ctx.sessions, ctx.store, lambda: ctx.bus, signing_key,
                            presign_seconds=s.presign_seconds, shadow_frames=s.shadow_frames,
                            resend_seconds=s.rollouts.resend_seconds, max_sends=s.rollouts.max_sends,
                            interval=max(s.rollouts.reconcile_seconds, 1.0))
