"""The drift monitor: consumes devices' DriftReports (from ingest), scores them per device and per
group against the model version's reference, persists every window, and acts on what rises or
clears -- by policy (``DriftPolicy``):

* drift raised on a device: alert (DB, MQTT, webhook, dashboard), raise the device's sampling
  rate, request a retrain through the coalescing scheduler; cleared: alert, sampling restored;
* performance decay raised on a device: alert, and roll the device back to the version it ran
  before when the decay came within ``rollback_within_windows`` of switching to this one, else
  request a retrain;
* a group's drift or decay: alert and retrain request.

Every action is recorded as a ``drift_events`` row with its outcome (done / waiting / skipped /
failed), linked to the alert and training job it produced. The I/O it triggers is injected
(callables), so the decisions are testable without a broker or a trainer.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from protocol.alerts import AlertKind, Severity
from protocol.messages import DriftReport, SamplingConfigCommand
from server.db.models import Device, DriftEvent, DriftWindow
from server.drift.policy import GroupRound, SubjectState, Verdict, Window, evaluate
from server.drift.reference import components_of
from server.settings import DriftPolicy

log = structlog.get_logger(__name__)

DEVICE, GROUP = "device", "group"


@dataclass(frozen=True)
class RetrainOutcome:
    status: str  # done | waiting | skipped
    job_id: int | None = None
    detail: str = ""


class DriftMonitor:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        policy: DriftPolicy,
        references,  # server.drift.reference.ReferenceService (get, request)
        *,
        alerts=None,  # server.alerts.AlertService
        request_retrain: Callable[[str], RetrainOutcome] | None = None,
        send_command: Callable[[str, object], None] | None = None,
        rollback: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self.policy = policy
        self.references = references
        self._alerts = alerts
        self._request_retrain = request_retrain
        self._send_command = send_command
        self._rollback = rollback
        self._lock = threading.Lock()
        self._states: dict[tuple[str, str, int | None], SubjectState] = {}
        self._rounds: dict[tuple[str, int | None], GroupRound] = {}

    # ------------------------------------------------------------------ entry point

    def handle(self, report: DriftReport) -> Verdict | None:
        """One device window; returns the device's verdict (None when it could not be scored)."""
        return self.handle_many([report])[0]

    def handle_many(self, reports: Sequence[DriftReport]) -> list[Verdict | None]:
        """Windows in arrival order, scored in one transaction (one lookup per table for the lot,
        one commit): at 10,000 devices a commit per window was what the drift worker could not
        keep up with. If the batch fails, each window is scored again in a transaction of its own,
        so a bad one costs only itself. Returns each window's verdict."""
        if not self.policy.enabled or not reports:
            return [None] * len(reports)
        with self._lock:
            try:
                return self._handle(reports)
            except Exception:
                if len(reports) == 1:
                    raise
                log.warning("drift.batch_failed", windows=len(reports), exc_info=True)
                self._states.clear()  # what the failed batch put there was rolled back
        verdicts: list[Verdict | None] = []
        for report in reports:
            try:
                with self._lock:
                    verdicts.extend(self._handle([report]))
            except Exception:
                log.exception("drift.window_failed", device=report.device_id, msg_id=report.msg_id)
                verdicts.append(None)
        return verdicts

    def _handle(self, reports: Sequence[DriftReport]) -> list[Verdict | None]:
        verdicts: list[Verdict | None] = []
        todo: list[tuple] = []
        refs: dict[int, object] = {}  # each version's reference, looked up (and requested) once a batch
        with self._sessions() as session:
            seen = set(session.scalars(select(DriftWindow.msg_id).where(
                DriftWindow.msg_id.in_([r.msg_id for r in reports]))))
            devices = {d.id: d for d in session.scalars(
                select(Device).where(Device.id.in_({r.device_id for r in reports})))}
            for report in reports:
                if report.msg_id in seen:
                    verdicts.append(None)  # QoS 1 redelivery (or twice in this batch)
                    continue
                seen.add(report.msg_id)
                verdicts.append(self._score(session, report, devices.get(report.device_id), todo, refs))
            # Windows are committed before any action: alerts, the scheduler and rollbacks write
            # through their own sessions, which an open write transaction here would block.
            session.commit()
        for item in todo:
            self._act(*item)
        return verdicts

    def _score(self, session: Session, report: DriftReport, device: Device | None, todo: list,
               refs: dict[int, object]) -> Verdict | None:
        """Store and judge one window in the batch's transaction; what to act on goes to ``todo``."""
        if device is None or device.revoked:
            log.warning("drift.unknown_device", device=report.device_id)
            return None
        groups = self._groups_of(device)
        window = Window(frames=report.frames,
                        histograms={k: (h.edges, h.counts) for k, h in report.histograms.items()},
                        correction_rate=report.correction_rate, qa_frames=report.qa_frames)
        version = report.model_version
        if version is not None and version not in refs:
            refs[version] = self.references.get(version)
            if refs[version] is None:
                self.references.request(version)
        reference = refs.get(version) if version is not None else None
        if reference is None:
            session.add(DriftWindow(scope=DEVICE, subject=report.device_id, msg_id=report.msg_id,
                                    model_version=report.model_version, window=report.window,
                                    frames=report.frames, status="no_reference",
                                    correction_rate=report.correction_rate))
            return None
        components = components_of(reference)
        verdict = self._judge(session, DEVICE, report.device_id, report.model_version, window, components,
                              msg_id=report.msg_id, number=report.window)
        todo.append((DEVICE, report.device_id, report.model_version, report.window, verdict))
        for group in groups:
            closed = self._rounds.setdefault((group, report.model_version), GroupRound()).add(
                report.device_id, window)
            if closed is not None:
                group_verdict = self._judge(session, GROUP, group, report.model_version, closed, components)
                todo.append((GROUP, group, report.model_version, None, group_verdict))
        return verdict

    def _groups_of(self, device: Device) -> list[str]:
        """Configured glob groups, plus the device's own groups where the registry has them."""
        named = [g for g, patterns in self.policy.groups.items()
                 if any(fnmatch.fnmatchcase(device.id, p) for p in patterns)]
        return sorted(set(named) | set(getattr(device, "groups", None) or []))

    # ------------------------------------------------------------------ scoring + persistence

    def _state(self, session: Session, scope: str, subject: str, version: int | None) -> SubjectState:
        # Devices run one model at a time: their state follows the model. Groups may be mid-rollout
        # (mixed versions): one state per version, so alternating rounds do not reset each other.
        key = (scope, subject, version if scope == GROUP else None)
        if key not in self._states:
            query = select(DriftWindow.state).where(DriftWindow.scope == scope, DriftWindow.subject == subject,
                                                    DriftWindow.status == "scored")
            if scope == GROUP:
                query = query.where(DriftWindow.model_version == version)
            last = session.scalar(query.order_by(DriftWindow.id.desc()).limit(1))
            self._states[key] = SubjectState.from_dict(last) if last else SubjectState()
        return self._states[key]

    def _judge(self, session: Session, scope: str, subject: str, version: int | None, window: Window,
               components, *, msg_id: str | None = None, number: int = 0) -> Verdict:
        state = self._state(session, scope, subject, version)
        verdict = evaluate(state, window, version, components, self.policy)
        session.add(DriftWindow(
            scope=scope, subject=subject, msg_id=msg_id, model_version=version, window=number,
            frames=window.frames, status="scored", correction_rate=window.correction_rate,
            scores={"component": verdict.component, "over": verdict.over,
                    "metrics": {k: v.as_dict() for k, v in verdict.scores.items()}},
            decay={**{k: (round(v, 6) if v is not None else None) for k, v in verdict.decay.items()},
                   "reasons": verdict.decay_reasons},
            drifting=verdict.drifting, decayed=verdict.decayed, state=state.to_dict()))
        session.flush()
        return verdict

    # ------------------------------------------------------------------ actions

    def _record(self, scope: str, subject: str, version: int | None, signal: str, event: str, action: str,
                status: str, *, alert_id: int | None = None, job_id: int | None = None, **detail) -> None:
        with self._sessions() as session:
            session.add(DriftEvent(scope=scope, subject=subject, model_version=version, signal=signal, event=event,
                                   action=action, status=status, detail=detail, alert_id=alert_id, job_id=job_id))
            session.commit()
        log.info("drift.action", scope=scope, subject=subject, signal=signal, change=event, action=action,
                 status=status, **detail)

    def _act(self, scope: str, subject: str, version: int | None, number: int | None,
             verdict: Verdict) -> None:
        where = f"{scope} {subject}"
        if verdict.drift_event == "raised":
            metrics = {m: round(verdict.values[m], 4) for m in verdict.drifting_metrics if m in verdict.values}
            thresholds = {m: self.policy.threshold_for(m).model_dump() for m in metrics}
            message = (f"{where} drifted from model {version}'s training data: "
                       + ", ".join(f"{m} {self.policy.threshold_for(m).statistic}={v:.2f}" for m, v in metrics.items()))
            self._alert(scope, subject, version, "drift", "raised", AlertKind.DRIFT, Severity.WARNING,
                        message, metrics=metrics, thresholds=thresholds, window=number, component=verdict.component)
            if scope == DEVICE:
                self._sampling(subject, version, "raised", self.policy.boost_random_rate)
            if self.policy.retrain_on_drift:
                self._retrain(scope, subject, version, "drift", f"drift on {where}: {', '.join(metrics)}")
        elif verdict.drift_event == "cleared":
            reason = "model changed" if verdict.model_changed else "back within the thresholds"
            self._alert(scope, subject, version, "drift", "cleared", AlertKind.DRIFT, Severity.INFO,
                        f"{where}: drift cleared ({reason})", window=number)
            if scope == DEVICE:
                self._sampling(subject, version, "cleared", self.policy.normal_random_rate)
        elif verdict.drifting and self.policy.retrain_on_drift:
            self._retry_waiting(scope, subject, version, "drift")

        if verdict.decay_event == "raised":
            message = f"{where}: model {version} performance decayed: " + "; ".join(verdict.decay_reasons)
            self._alert(scope, subject, version, "decay", "raised", AlertKind.PERFORMANCE_DECAY,
                        Severity.CRITICAL, message, window=number,
                        figures={k: v for k, v in verdict.decay.items() if v is not None})
            rolled = scope == DEVICE and self._maybe_rollback(subject, version, message)
            if not rolled and self.policy.retrain_on_decay:
                self._retrain(scope, subject, version, "decay", f"performance decay on {where}")
        elif verdict.decay_event == "cleared":
            self._alert(scope, subject, version, "decay", "cleared", AlertKind.PERFORMANCE_DECAY,
                        Severity.INFO, f"{where}: performance recovered", window=number)
        elif verdict.decayed and self.policy.retrain_on_decay:
            self._retry_waiting(scope, subject, version, "decay")

    def _alert(self, scope: str, subject: str, version: int | None, signal: str, event: str,
               kind: AlertKind, severity: Severity, message: str, **details) -> None:
        if not self.policy.alert or self._alerts is None:
            self._record(scope, subject, version, signal, event, "alert", "skipped", message=message)
            return
        try:
            alert = self._alerts.raise_alert(kind, severity, message, subject=f"{scope}:{subject}",
                                             details={"scope": scope, "subject": subject, "model_version": version,
                                                      "signal": signal, "event": event, **details})
            self._record(scope, subject, version, signal, event, "alert", "done", alert_id=alert.id,
                         message=message)
        except Exception as exc:
            self._record(scope, subject, version, signal, event, "alert", "failed", error=str(exc))

    def _sampling(self, device_id: str, version: int | None, event: str, rate: float) -> None:
        if not self.policy.boost_sampling:
            return
        if self._send_command is None:
            self._record(DEVICE, device_id, version, "drift", event, "sampling", "skipped",
                         reason="no MQTT bus")
            return
        command = SamplingConfigCommand(device_id=device_id, random_rate=rate)
        try:
            self._send_command(device_id, command)
            self._record(DEVICE, device_id, version, "drift", event, "sampling", "done", random_rate=rate,
                         command_id=command.command_id)
        except Exception as exc:
            self._record(DEVICE, device_id, version, "drift", event, "sampling", "failed", error=str(exc))

    def _retrain(self, scope: str, subject: str, version: int | None, signal: str, reason: str) -> None:
        if self._request_retrain is None:
            self._record(scope, subject, version, signal, "raised", "retrain", "skipped",
                         reason="no retrain scheduler")
            return
        try:
            outcome = self._request_retrain(reason)
        except Exception as exc:
            self._record(scope, subject, version, signal, "raised", "retrain", "failed", error=str(exc))
            return
        self._record(scope, subject, version, signal, "raised", "retrain", outcome.status,
                     job_id=outcome.job_id, reason=reason, note=outcome.detail)

    def _retry_waiting(self, scope: str, subject: str, version: int | None, signal: str) -> None:
        """A retrain that waited for labeled samples is asked again while its signal stays raised."""
        with self._sessions() as session:
            last = session.scalar(select(DriftEvent).where(
                DriftEvent.scope == scope, DriftEvent.subject == subject, DriftEvent.signal == signal,
                DriftEvent.action == "retrain").order_by(DriftEvent.id.desc()).limit(1))
        if last is not None and last.status == "waiting" and last.model_version == version:
            self._retrain(scope, subject, version, signal, last.detail.get("reason", f"{signal} on {subject}"))

    def _maybe_rollback(self, device_id: str, version: int | None, message: str) -> bool:
        state = self._states.get((DEVICE, device_id, None))
        if not self.policy.rollback_on_decay or version is None or state is None:
            return False
        if state.windows > self.policy.rollback_within_windows:
            return False  # the model served well for a while: decay, not a bad switch
        with self._sessions() as session:
            previous = session.scalar(select(DriftWindow.model_version).where(
                DriftWindow.scope == DEVICE, DriftWindow.subject == device_id, DriftWindow.model_version.is_not(None),
                DriftWindow.model_version != version).order_by(DriftWindow.id.desc()).limit(1))
        if previous is None:
            self._record(DEVICE, device_id, version, "decay", "raised", "rollback", "skipped",
                         reason="no earlier version seen on this device")
            return False
        if self._rollback is None:
            self._record(DEVICE, device_id, version, "decay", "raised", "rollback", "skipped",
                         reason="no MQTT bus", to_version=previous)
            return False
        reason = f"decayed {state.windows} windows after switching to {version}: {message}"[:1000]
        try:
            self._rollback(device_id, previous, reason)
        except Exception as exc:
            self._record(DEVICE, device_id, version, "decay", "raised", "rollback", "failed",
                         error=str(exc), to_version=previous)
            return False
        self._record(DEVICE, device_id, version, "decay", "raised", "rollback", "done",
                     to_version=previous, windows_since_switch=state.windows)
        return True
