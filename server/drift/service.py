"""Builds the drift monitor of a running server: its reference service and the I/O its actions
use (the MQTT bus, the coalescing retrain scheduler, signed rollbacks), from the server context."""

from __future__ import annotations

from server.drift.monitor import DriftMonitor, RetrainOutcome
from server.drift.reference import ReferenceService


def make_drift_monitor(ctx, signing_key) -> DriftMonitor:
    """``ctx`` is the ServerContext (its bus may be attached later); ``signing_key`` signs rollbacks."""
    settings, sessions, store = ctx.settings, ctx.sessions, ctx.store
    policy = settings.drift

    def request_retrain(reason: str) -> RetrainOutcome:
        from server.ingest import pending_labeled_samples

        with sessions() as session:
            pending = pending_labeled_samples(session)
        if pending < policy.retrain_min_samples:
            return RetrainOutcome("waiting", detail=f"{pending} labeled samples pending, "
                                                    f"{policy.retrain_min_samples} needed to learn from")
        job = ctx.scheduler.request("drift", reason, "drift-monitor")
        return RetrainOutcome("done", job.id, detail=f"{pending} labeled samples pending")

    def send_command(device_id: str, command) -> None:
        if ctx.bus is None:
            raise ConnectionError("the server has no MQTT bus")
        ctx.bus.publish_command(device_id, command)

    def rollback(device_id: str, version: int, reason: str) -> None:
        from server.deploy import rollback_version

        if ctx.bus is None:
            raise ConnectionError("the server has no MQTT bus")
        with sessions() as session:
            rollback_version(session, store, ctx.bus, signing_key, version, [device_id], reason=reason,
                             presign_seconds=settings.presign_seconds, actor="drift-monitor")

    return DriftMonitor(sessions, policy, ReferenceService(sessions, store, settings), alerts=ctx.alerts,
                        request_retrain=request_retrain, send_command=send_command, rollback=rollback)
