"""Database rows → the pure inputs of plan.py and gates.py (shared by the controller and the API
views, so that what the dashboard shows is what the controller decides on)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.models import Rollout, RolloutDevice, RolloutShadowReport, RolloutWave
from server.rollouts import plan
from server.rollouts.gates import (
    DeviceEvidence,
    ShadowTotals,
    ShadowWindow,
    Verdict,
    shadow_verdict,
    switch_verdict,
    totals,
)
from server.rollouts.spec import RETIRED_GATES, GateConfig


def facts(dev: RolloutDevice) -> plan.DeviceFacts:
    return plan.DeviceFacts(
        goal=dev.goal, update_state=dev.update_state or "", rollback_state=dev.rollback_state or "",
        deployed=dev.deploy_command_id is not None, promoted=dev.promote_command_id is not None,
        aborted=dev.abort_command_id is not None, rolled_back=dev.rollback_command_id is not None,
        from_version=dev.from_version, failure=dev.failure or "", reason=dev.reason or "")


def shadow_totals(session: Session, devices: Iterable[RolloutDevice],
                  cache: ShadowTotalsCache | None = None) -> dict[str, ShadowTotals]:
    """Each device's reported windows for its current deploy (an earlier attempt's do not count),
    through ``cache`` when given (the controller's: only devices that reported since are read)."""
    by_command = {d.deploy_command_id: d.device_id for d in devices if d.deploy_command_id}
    if cache is not None:
        return cache.totals(session, by_command)
    return {by_command[command]: totals(ws) for command, ws in _windows(session, list(by_command)).items()}


def _windows(session: Session, commands: list[str]) -> dict[str, list[ShadowWindow]]:
    windows: dict[str, list[ShadowWindow]] = defaultdict(list)
    if commands:
        rows = session.scalars(select(RolloutShadowReport)
                               .where(RolloutShadowReport.deploy_command_id.in_(commands)))
        for r in rows:
            windows[r.deploy_command_id].append(ShadowWindow(
                frames=r.frames, agreement=r.agreement, confident_agreement=r.confident_agreement,
                corrected_frames=r.corrected_frames,
                active_accuracy=r.active_accuracy, candidate_accuracy=r.candidate_accuracy,
                candidate_only_correct=r.candidate_only_correct, active_only_correct=r.active_only_correct,
                active_latency_ms_p99=r.active_latency_ms_p99,
                candidate_latency_ms_p99=r.candidate_latency_ms_p99, errors=r.errors,
                at=r.received_at.timestamp() + r.window * 1e-6))
    return windows


class ShadowTotalsCache:
    """Each deploy command's totals, recomputed only when its number of reports changed.

    Reports are only ever added (one row per message id, never updated), so an unchanged count is
    an unchanged set of windows. A gate evaluation then costs one grouped count in SQL plus reading
    the windows of the devices that reported since; rescanning every report of a 10,000-device wave
    each pass (and each dashboard poll) was what held the server's one core. Thread-safe: the
    controller and the API's views share one."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._entries: dict[str, tuple[int, ShadowTotals]] = {}
        self._lock = threading.Lock()
        self._max = max_entries

    def totals(self, session: Session, by_command: dict[str, str]) -> dict[str, ShadowTotals]:
        if not by_command:
            return {}
        counts = dict(session.execute(
            select(RolloutShadowReport.deploy_command_id, func.count())
            .where(RolloutShadowReport.deploy_command_id.in_(list(by_command)))
            .group_by(RolloutShadowReport.deploy_command_id)).all())
        with self._lock:
            stale = [c for c, n in counts.items() if self._entries.get(c, (-1,))[0] != n]
        fresh = _windows(session, stale)
        with self._lock:
            for command in stale:
                windows = fresh.get(command, [])
                # What was read, not what was counted: a report that landed in between is read next time.
                self._entries[command] = (len(windows), totals(windows))
            out = {by_command[c]: self._entries[c][1] for c in counts if c in self._entries}
            if len(self._entries) > self._max:  # finished rollouts' commands
                self._entries = {c: e for c, e in self._entries.items() if c in by_command}
        return out


def evidence(dev: RolloutDevice, shadow: ShadowTotals | None, now: datetime) -> DeviceEvidence:
    f = facts(dev)
    state = plan.device_state(f)
    started = dev.shadow_started_at
    # Past shadow without a promotion from us: an agent that promotes itself (its windows are final).
    left_shadow = started is not None and not f.promoted and state in (plan.D_PROMOTING, plan.D_ACTIVE)
    return DeviceEvidence(
        device_id=dev.device_id, failed=bool(dev.failure),
        # Past shadow already (an agent that promotes itself) is as far as holding goes.
        shadowing=state == plan.D_SHADOWING or left_shadow,
        final=left_shadow,
        running_candidate=plan.runs_candidate(f),
        settled=plan.settled(f) or bool(dev.failure),
        shadow=shadow or ShadowTotals(),
        shadow_seconds=max(0.0, (now - started).total_seconds()) if started else 0.0,
    )


def gate_config(rollout: Rollout) -> GateConfig:
    return GateConfig.model_validate({k: v for k, v in rollout.gates.items() if k not in RETIRED_GATES})


def wave_verdict(rollout: Rollout, wave: RolloutWave, devices: Sequence[RolloutDevice],
                 shadow: dict[str, ShadowTotals], now: datetime) -> Verdict:
    """The wave's gates as they stand (the phase decides which verdict applies)."""
    config = gate_config(rollout)
    evidences = [evidence(d, shadow.get(d.device_id), now) for d in devices]
    if wave.phase == plan.PHASE_SHADOW:
        # A device with no model of its own (last wave only) has nothing to be compared with.
        judged = [e for e, d in zip(evidences, devices, strict=True) if d.from_version is not None or e.failed]
        if not judged and evidences:
            return Verdict("pass", (), "no device of the wave had an active model to shadow against")
        return shadow_verdict(judged, config)
    return switch_verdict(evidences, config)
