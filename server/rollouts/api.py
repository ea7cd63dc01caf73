"""Rollout service functions behind the API and the dashboard: create, operator actions, and the
JSON view of a rollout (:func:`rollout_dict`, also what the dashboard's live stream sends).

Operator actions change only the rollout's state, with a conditional UPDATE (``WHERE state IN
allowed``), so an action racing the controller's pass either applies to the state the pass
committed or is refused with 409; the controller does the rest on its next pass (stopping or
reverting devices), which the caller nudges.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from server import audit, registry
from server.api.schemas import DB_ID_MAX
from server.db.models import Device, ModelVersion, Rollout, RolloutDevice, RolloutWave, utcnow
from server.deploy import DeployError, deployable
from server.rollouts import plan
from server.rollouts.evidence import LiveVerdicts, ShadowTotalsCache, shadow_totals, wave_verdict
from server.rollouts.spec import RolloutCreate, WaveSpec


class RolloutError(Exception):
    """A refused rollout request; ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _version(session: Session, version: int | str) -> int:
    if version == "production":
        prod = registry.production(session)
        if prod is None:
            raise RolloutError(409, "there is no production model to roll out")
        version = prod.version
    if not 1 <= int(version) <= DB_ID_MAX:  # RolloutCreate accepts any int; the database does not
        raise RolloutError(422, f"version {version} is out of range (1 to {DB_ID_MAX})")
    try:
        deployable(session, int(version))
    except DeployError as exc:
        raise RolloutError(404 if "does not exist" in str(exc) else 409, str(exc)) from None
    return int(version)


def active_rollout(session: Session) -> Rollout | None:
    return session.scalar(select(Rollout).where(Rollout.state.in_(plan.ACTIVE)).order_by(Rollout.id))


def create_rollout(session: Session, body: RolloutCreate, policy, *, actor: str, source: str = "",
                   supersede: bool = False) -> Rollout:
    """A new rollout (committed). One rollout runs at a time: another active one is a 409, or is
    aborted first when ``supersede`` (a newer production version replaces an older one's rollout)."""
    version = _version(session, body.version)
    current = active_rollout(session)
    if current is not None:
        if not supersede:
            raise RolloutError(409, f"rollout {current.id} (version {current.version}) is still {current.state}; "
                                    "abort it or let it finish first")
        act(session, current.id, "abort", actor=actor, source=source,
            reason=f"superseded by a rollout of version {version}")
    gates = body.merged_gates(policy.gates)
    waves: list[WaveSpec] = body.waves or policy.waves
    now = utcnow()
    rollout = Rollout(
        version=version, state=plan.AWAITING_APPROVAL if body.require_approval else plan.PENDING,
        mode=body.mode or policy.mode, on_failure=body.on_failure or policy.on_failure,
        require_approval=body.require_approval, selector=body.selector.model_dump(mode="json"),
        gates=gates.model_dump(mode="json"), shadow_frames=min(gates.min_frames, policy.shadow_window_frames),
        current_wave=0, reason=body.reason or ("waiting for approval to start" if body.require_approval else ""),
        created_by=actor, created_at=now, updated_at=now)
    session.add(rollout)
    session.flush()
    for position, wave in enumerate(waves):
        session.add(RolloutWave(rollout_id=rollout.id, position=position, name=wave.name, percent=wave.percent,
                                count=wave.count))
    audit.record(session, actor, "rollout.create", f"rollout:{rollout.id}", source, version=version,
                 selector=rollout.selector, waves=[w.model_dump(exclude_none=True) for w in waves],
                 gates=rollout.gates, mode=rollout.mode, on_failure=rollout.on_failure,
                 require_approval=rollout.require_approval, reason=body.reason)
    session.commit()
    return rollout


def create_auto_rollout(session: Session, version: int, settings, *, actor: str) -> Rollout:
    """What auto_deploy does when a version is approved: the policy's auto waves, the legacy
    ``shadow_frames`` as the frames gate; an older version's active rollout is aborted. Its
    completion makes the version production."""
    policy = settings.rollouts
    body = RolloutCreate(version=version, waves=policy.auto_waves, gates={"min_frames": settings.shadow_frames},
                         reason=f"version {version} was approved")
    return create_rollout(session, body, policy, actor=actor, supersede=True)


def act(session: Session, rollout_id: int, action: str, *, actor: str, source: str = "",
        reason: str = "") -> Rollout:
    """approve | pause | resume | abort | rollback (committed)."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise RolloutError(404, f"rollout {rollout_id} does not exist")
    before = rollout.state
    try:
        target = plan.operator_transition(before, action)
    except plan.RolloutConflict as exc:
        raise RolloutError(409, str(exc)) from None
    now = utcnow()
    text = f"{action.replace('_', ' ')} by {actor}" + (f": {reason}" if reason else "")
    values: dict[str, Any] = {"state": target, "updated_at": now, "reason": text[:4000], "settled": False}
    if target in plan.FINISHED:
        values["finished_at"] = now
    result = session.execute(update(Rollout).where(Rollout.id == rollout_id, Rollout.state == before)
                             .values(**values).execution_options(synchronize_session=False))
    if result.rowcount != 1:
        session.rollback()
        state = session.scalar(select(Rollout.state).where(Rollout.id == rollout_id))
        raise RolloutError(409, f"rollout {rollout_id} changed meanwhile (now {state}); try again")
    audit.record(session, actor, f"rollout.{action}", f"rollout:{rollout_id}", source, reason=reason,
                 from_state=before, to_state=target)
    session.commit()
    session.refresh(rollout)
    return rollout


# ------------------------------------------------------------------ views


def _device_view(dev: RolloutDevice, device: Device | None, shadow) -> dict:
    s = shadow.as_dict() if shadow is not None else None
    return {
        "device_id": dev.device_id, "state": dev.state, "goal": dev.goal, "attempt": dev.attempt,
        "failure": dev.failure or None, "reason": dev.failure or dev.reason,
        "from_version": dev.from_version,
        "active_version": device.active_version if device else None,
        "candidate_version": device.candidate_version if device else None,
        "online": bool(device.online) if device else False,
        "update_state": dev.update_state, "rollback_state": dev.rollback_state,
        "assigned_at": dev.assigned_at, "shadow_started_at": dev.shadow_started_at, "updated_at": dev.updated_at,
        "shadow": s,
    }


def rollout_dict(session: Session, rollout: Rollout, *, devices: bool = True, now: datetime | None = None,
                 cache: ShadowTotalsCache | None = None, live: LiveVerdicts | None = None) -> dict:
    """The rollout with its waves, each wave's gates (live for the running wave, as decided for a
    finished one) and, with ``devices``, each device's state and shadow figures. ``cache``: the
    controller's shadow totals, so that a view costs what a controller pass does; ``live``: the
    controller's verdicts, used for the running wave while they are fresh (``verdict_at`` says
    when the verdict shown was reached)."""
    now = now or utcnow()
    waves = session.scalars(select(RolloutWave).where(RolloutWave.rollout_id == rollout.id)
                            .order_by(RolloutWave.position)).all()
    running = {w.position: w for w in waves if w.state == plan.WAVE_RUNNING}
    known = {p: live.get(rollout.id, w, now) for p, w in running.items()} if live is not None else {}
    if devices:
        members = session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)
                                  .order_by(RolloutDevice.device_id)).all()
        counts: dict[int, Counter] = {}
        for m in members:
            counts.setdefault(m.wave, Counter())[m.state] += 1
    else:
        # Counts in SQL; devices only of a running wave whose verdict must be computed here.
        counts = {}
        for wave_position, state, n in session.execute(
                select(RolloutDevice.wave, RolloutDevice.state, func.count())
                .where(RolloutDevice.rollout_id == rollout.id).group_by(RolloutDevice.wave, RolloutDevice.state)):
            counts.setdefault(wave_position, Counter())[state] = n
        judge = [p for p in running if known.get(p) is None]
        members = session.scalars(select(RolloutDevice).where(
            RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave.in_(judge))
            .order_by(RolloutDevice.device_id)).all() if judge else []
    by_wave: dict[int, list[RolloutDevice]] = {}
    for m in members:
        by_wave.setdefault(m.wave, []).append(m)
    shadow = shadow_totals(session, members if devices else [m for m in members if m.wave in running], cache)
    inventory = {d.id: d for d in session.scalars(
        select(Device).where(Device.id.in_([m.device_id for m in members])))} if devices and members else {}
    out_waves = []
    for wave in waves:
        wave_members = by_wave.get(wave.position, [])
        entry: dict[str, Any] = {
            "index": wave.position, "name": wave.name, "percent": wave.percent, "count": wave.count,
            "target": wave.target, "state": wave.state, "phase": wave.phase or None, "attempt": wave.attempt,
            "started_at": wave.started_at, "finished_at": wave.finished_at, "reason": wave.reason,
            "device_counts": dict(counts.get(wave.position, {})),
            "gates": list(wave.gate_results), "verdict": None, "verdict_at": None,
        }
        if wave.state == plan.WAVE_RUNNING:
            fresh = known.get(wave.position)
            if fresh is not None:
                verdict, entry["verdict_at"] = fresh.verdict, fresh.at
            else:
                verdict, entry["verdict_at"] = wave_verdict(rollout, wave, wave_members, shadow, now), now
            live_gates = [g.as_dict() for g in verdict.gates]
            names = {g["name"] for g in live_gates}
            # In the switch phase the shadow gates are the ones decided when the wave was promoted.
            entry["gates"] = [g for g in wave.gate_results if g["name"] not in names] + live_gates
            entry["verdict"] = {"outcome": verdict.outcome, "reason": verdict.reason}
        if devices:
            entry["devices"] = [_device_view(m, inventory.get(m.device_id), shadow.get(m.device_id))
                                for m in wave_members]
        out_waves.append(entry)
    return {
        "id": rollout.id, "version": rollout.version, "state": rollout.state, "mode": rollout.mode,
        "on_failure": rollout.on_failure, "require_approval": rollout.require_approval,
        "selector": rollout.selector, "gates": rollout.gates, "shadow_frames": rollout.shadow_frames,
        "created_by": rollout.created_by, "created_at": rollout.created_at, "updated_at": rollout.updated_at,
        "finished_at": rollout.finished_at, "settled": rollout.settled, "current_wave": rollout.current_wave,
        "reason": rollout.reason, "offline_evidence": offline_evidence(session.get(ModelVersion, rollout.version)),
        "waves": out_waves,
    }


_OFFLINE_SLICES = (("golden_class_recall", "golden class {}"), ("device_recall", "device {}"))


def offline_evidence(mv: ModelVersion | None) -> dict | None:
    """The version's offline gate as a flat list of checks, shown beside the online evidence (a
    wave fails only on significant online evidence, never on less than the offline gate had)."""
    if mv is None:
        return None
    gate = mv.gate or {}
    checks = []
    for key, name in (("golden_map50_95", "golden"), ("new_data_map50_95", "new_data")):
        c = (gate.get("checks") or {}).get(key)
        if c:
            checks.append({"name": name, "metric": "map50_95", "candidate": c["candidate"],
                           "production": c["production"], "threshold": c["threshold"], "passed": c["passed"]})
    for key, label in _OFFLINE_SLICES:
        for part, c in sorted(((gate.get("checks") or {}).get(key) or {}).items()):
            checks.append({"name": label.format(part), "metric": "recall", "candidate": c["candidate"],
                           "production": c["production"], "threshold": c["threshold"], "passed": c["passed"]})
    return {"parent_version": mv.parent_version, "passed": gate.get("passed"), "reasons": list(gate.get("reasons") or []),
            "checks": checks}


def list_rollouts(session: Session, *, state: str | None = None, limit: int = 20, offset: int = 0) -> dict:
    """Newest first; items are rollout_dict without the per-device lists (see device_counts)."""
    query, count = select(Rollout), select(func.count()).select_from(Rollout)
    if state:
        query, count = query.where(Rollout.state == state), count.where(Rollout.state == state)
    rows = session.scalars(query.order_by(Rollout.id.desc()).limit(limit).offset(offset)).all()
    return {"total": session.scalar(count) or 0, "limit": limit, "offset": offset,
            "items": [rollout_dict(session, r, devices=False) for r in rows]}
