"""Database rows → the pure inputs of plan.py and gates.py (shared by the controller and the API
views, so that what the dashboard shows is what the controller decides on)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.models import Rollout, RolloutDevice, RolloutShadowReport, RolloutWave
from server.rollouts import plan
from server.rollouts.gates import (
    DeviceEvidence,
    ShadowTotals,
    ShadowWindow,
    TotalsBuilder,
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
    return {by_command[command]: totals(w for _, w in rows)
            for command, rows in _windows(session, list(by_command)).items()}


_WINDOW_COLUMNS = (
    RolloutShadowReport.deploy_command_id, RolloutShadowReport.received_at, RolloutShadowReport.window,
    RolloutShadowReport.frames, RolloutShadowReport.agreement, RolloutShadowReport.confident_agreement,
    RolloutShadowReport.corrected_frames, RolloutShadowReport.active_accuracy,
    RolloutShadowReport.candidate_accuracy, RolloutShadowReport.candidate_only_correct,
    RolloutShadowReport.active_only_correct, RolloutShadowReport.active_latency_ms_p99,
    RolloutShadowReport.candidate_latency_ms_p99, RolloutShadowReport.errors)


def _windows(session: Session, commands: list[str], after: datetime | None = None
             ) -> dict[str, list[tuple[datetime, ShadowWindow]]]:
    """Each command's windows (with when each was received), oldest first; only those received
    after ``after`` when given."""
    windows: dict[str, list[tuple[datetime, ShadowWindow]]] = defaultdict(list)
    for start in range(0, len(commands), 500):
        query = select(*_WINDOW_COLUMNS).where(RolloutShadowReport.deploy_command_id.in_(commands[start:start + 500]))
        if after is not None:
            query = query.where(RolloutShadowReport.received_at > after)
        for (command, received, window, frames, agreement, confident, corrected, active_acc, candidate_acc,
             candidate_only, active_only, active_p99, candidate_p99, errors) in session.execute(query):
            windows[command].append((received, ShadowWindow(
                frames=frames, agreement=agreement, confident_agreement=confident, corrected_frames=corrected,
                active_accuracy=active_acc, candidate_accuracy=candidate_acc,
                candidate_only_correct=candidate_only, active_only_correct=active_only,
                active_latency_ms_p99=active_p99, candidate_latency_ms_p99=candidate_p99, errors=errors,
                at=received.timestamp() + window * 1e-6)))
    for rows in windows.values():
        rows.sort(key=lambda row: row[1].at)
    return windows


class _Entry:
    __slots__ = ("builder", "newest", "totals")

    def __init__(self) -> None:
        self.builder = TotalsBuilder()
        self.newest: datetime | None = None  # the latest received_at read
        self.totals = ShadowTotals()


class ShadowTotalsCache:
    """Each deploy command's totals, extended with only the reports it has not read yet.

    Reports are only ever added (one row per message id, never updated), so an unchanged count is
    an unchanged set of windows. A gate evaluation costs one grouped count in SQL, then for the
    devices whose count moved, reading the reports received since the newest one already read and
    adding them to that device's running sums (:class:`TotalsBuilder`). Rescanning every report of
    a 10,000-device wave each pass (and each dashboard poll) was what held the server's one core.

    A report committed late, with a received time older than one already read (another replica's
    clock, a slow transaction), leaves the sums one short of the count: that device is then read
    again in full, so nothing is ever missed for longer than one evaluation. Thread-safe: the
    controller and the API's views share one."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._max = max_entries

    def totals(self, session: Session, by_command: dict[str, str]) -> dict[str, ShadowTotals]:
        if not by_command:
            return {}
        with self._lock:  # one evaluation at a time: two must not extend the same sums
            return self._totals(session, by_command)

    def _totals(self, session: Session, by_command: dict[str, str]) -> dict[str, ShadowTotals]:
        commands = list(by_command)
        counts: dict[str, int] = {}
        for start in range(0, len(commands), 500):
            counts.update(session.execute(
                select(RolloutShadowReport.deploy_command_id, func.count())
                .where(RolloutShadowReport.deploy_command_id.in_(commands[start:start + 500]))
                .group_by(RolloutShadowReport.deploy_command_id)).all())
        entries = {c: self._entries.get(c) for c in counts}
        stale = [c for c, n in counts.items() if entries[c] is None or entries[c].builder.count != n]
        extend = [c for c in stale if entries[c] is not None and entries[c].newest is not None]
        extending = set(extend)
        fresh = [c for c in stale if c not in extending]
        if extend:
            since = min(entries[c].newest for c in extend)
            new = _windows(session, extend, after=since)
            for command in extend:
                entry = entries[command]
                rows = [(r, w) for r, w in new.get(command, []) if r > entry.newest]
                if rows and rows[0][1].at >= entry.builder.last_at:
                    for _, window in rows:
                        entry.builder.add(window)
                    entry.newest = max(entry.newest, *(r for r, _ in rows))
                if entry.builder.count != counts[command]:
                    # A report older than the newest one read (or one that landed since the count):
                    # read this device's reports again in full.
                    fresh.append(command)
                else:
                    entry.totals = entry.builder.result()
        if fresh:
            full = _windows(session, fresh)
            for command in fresh:
                entry = entries[command] = _Entry()
                for received, window in full.get(command, []):
                    entry.builder.add(window)
                    entry.newest = received if entry.newest is None else max(entry.newest, received)
                entry.totals = entry.builder.result()
        self._entries.update(entries)
        if len(self._entries) > self._max:  # finished rollouts' commands
            self._entries = {c: e for c, e in self._entries.items() if c in by_command}
        return {by_command[c]: e.totals for c, e in entries.items()}


@dataclass(frozen=True)
class LiveVerdict:
    """A running wave's verdict as the controller's last committed pass computed it."""

    position: int
    attempt: int
    phase: str
    verdict: Verdict
    at: datetime


class LiveVerdicts:
    """The controller's latest verdict per rollout, for the API's views: a poller of a 10,000-device
    rollout reads what the last pass decided on instead of evaluating every gate again. Only a
    verdict for the wave as it stands (same position, attempt and phase) and at most ``max_age``
    seconds old is handed out; otherwise the view computes its own. Thread-safe."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._latest: dict[int, LiveVerdict] = {}
        self._lock = threading.Lock()

    def put(self, rollout_id: int, live: LiveVerdict | None) -> None:
        with self._lock:
            if live is None:
                self._latest.pop(rollout_id, None)
            else:
                self._latest[rollout_id] = live

    def get(self, rollout_id: int, wave: RolloutWave, now: datetime) -> LiveVerdict | None:
        with self._lock:
            live = self._latest.get(rollout_id)
        if live is None or (live.position, live.attempt, live.phase) != (wave.position, wave.attempt, wave.phase):
            return None
        age = (now - live.at).total_seconds()
        return live if 0 <= age <= self.max_age else None


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
