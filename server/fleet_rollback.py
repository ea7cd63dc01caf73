"""Roll the fleet back to a version in one action: the registry's production alias moves (with
its history), the rollout in the way is rolled back (its controller reverts its devices, with
resends), and every other device that runs something else gets a signed rollback command.

Devices that are offline keep the command in their broker session; with fleet convergence on,
any device still elsewhere when it comes back is sent production again. The audit log records
the action with every device it commanded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from server import audit, registry
from server.db.models import Device, ModelVersion, Rollout, RolloutDevice


@dataclass(frozen=True)
class FleetDevice:
    device_id: str
    active_version: int | None
    online: bool
    rollout_from_version: int | None = None  # its version before the rollout that is rolled back
    in_other_rollout: bool = False  # owned by another unsettled rollout: its controller acts for it


@dataclass
class FleetRollbackPlan:
    to_version: int
    commanded: list[str] = field(default_factory=list)  # sent a signed rollback now
    reverted_by_rollout: list[str] = field(default_factory=list)  # the rolled-back rollout takes them back
    left: list[str] = field(default_factory=list)  # busy elsewhere, or reverted to another version first


def plan_fleet_rollback(devices: list[FleetDevice], to_version: int) -> FleetRollbackPlan:
    """Which device goes back how: nothing for a device on ``to_version`` (or with no model); the
    rollout's own revert where that lands on ``to_version``; a direct signed command otherwise."""
    out = FleetRollbackPlan(to_version)
    for d in sorted(devices, key=lambda d: d.device_id):
        if d.rollout_from_version is not None:
            (out.reverted_by_rollout if d.rollout_from_version == to_version else out.left).append(d.device_id)
        elif d.active_version is None or d.active_version == to_version:
            continue
        elif d.in_other_rollout:
            out.left.append(d.device_id)
        else:
            out.commanded.append(d.device_id)
    return out


class FleetRollbackError(ValueError):
    """A fleet rollback that cannot be done (the API answers 409, or 404 for an unknown version)."""


def roll_fleet_back(session: Session, store, bus, signing_key, *, to_version: int | None, actor: str,
                    reason: str, source: str, presign_seconds: int) -> dict:
    """Do it (committed). ``to_version`` None: production, when a rollout of another version is
    under way (that rollout is what goes back); otherwise the production version before this one."""
    from server.deploy import rollback_version
    from server.rollouts.api import RolloutError, act
    from server.rollouts.plan import ACTIVE

    current = registry.production(session)
    rollout = session.scalar(select(Rollout).where(Rollout.state.in_(ACTIVE)).order_by(Rollout.id.desc()))
    target = to_version
    if target is None and current is not None and rollout is not None and rollout.version != current.version:
        target = current.version  # a version on its way out is what goes back: production stays
    try:
        target = registry.rollback_target(session).version if target is None else target
    except registry.RegistryError as exc:
        raise FleetRollbackError(str(exc)) from None
    if session.get(ModelVersion, target) is None:
        raise FleetRollbackError(f"model version {target} does not exist")
    from_version = current.version if current else None
    text = reason or f"fleet rolled back to version {target} by {actor}"
    moved = False
    if from_version != target:
        try:
            registry.rollback(session, target, actor=actor, reason=text)
        except registry.RegistryError as exc:
            raise FleetRollbackError(str(exc)) from None
        moved = True
    session.commit()

    reverted = None
    if rollout is not None and rollout.version != target:
        try:
            act(session, rollout.id, "rollback", actor=actor, source=source, reason=text)
            reverted = rollout.id
            abandoned = session.get(ModelVersion, rollout.version)
            if abandoned is not None and abandoned.status in (registry.APPROVED, registry.CANDIDATE):
                abandoned.status = "rolled_back"  # the operator judged it: no later approval of it
                candidate = registry.alias_version(session, registry.CANDIDATE)
                if candidate is not None and candidate.version == abandoned.version:
                    registry.clear_alias(session, registry.CANDIDATE, actor=actor, reason=text)
        except RolloutError:  # it finished meanwhile: its devices are handled as any other
            session.rollback()
    owners = dict(session.execute(select(RolloutDevice.device_id, RolloutDevice.rollout_id).join(
        Rollout, Rollout.id == RolloutDevice.rollout_id).where(Rollout.settled.is_(False))).all())
    from_versions = ({d.device_id: d.from_version for d in session.scalars(
        select(RolloutDevice).where(RolloutDevice.rollout_id == reverted))} if reverted else {})
    devices = [FleetDevice(d.id, d.active_version, bool(d.online), from_versions.get(d.id),
                           d.id in owners and owners[d.id] != reverted)
               for d in session.scalars(select(Device).where(Device.revoked.is_(False)))]
    plan = plan_fleet_rollback(devices, target)
    if not moved and not plan.commanded and reverted is None:
        raise FleetRollbackError(f"version {target} is production and no device runs another version")
    if plan.commanded:
        if bus is None:
            raise FleetRollbackError("the server has no MQTT bus to send rollback commands with")
        rollback_version(session, store, bus, signing_key, target, plan.commanded, reason=text,
                         presign_seconds=presign_seconds, actor=actor)
    offline = sorted(d.device_id for d in devices if not d.online and d.device_id in plan.commanded)
    audit.record(session, actor, "fleet.rollback", f"version:{target}", source, from_version=from_version,
                 reason=text, rollout=reverted, commanded=plan.commanded, reverted_by_rollout=plan.reverted_by_rollout,
                 left=plan.left, offline=offline)
    session.commit()
    return {"from_version": from_version, "to_version": target, "registry_moved": moved,
            "rollout_rolled_back": reverted, "commanded": plan.commanded,
            "reverted_by_rollout": plan.reverted_by_rollout, "left": plan.left, "offline": offline}
