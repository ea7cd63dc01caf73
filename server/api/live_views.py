"""What the dashboard shows, one JSON-ready dict per topic, read from the database.

``server.api.events`` computes these on a short interval and streams a topic only when its
dict changed. Each builder takes a session and returns plain JSON types (datetimes as ISO
strings), so the result can be compared and serialised once for every open stream.
Lists are capped: the page shows the recent and the active; the paged JSON API has the rest.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server import registry
from server.db.models import (
    AlertRecord,
    Device,
    DeviceLabel,
    ModelVersion,
    Quarantine,
    Sample,
    TrainingJob,
)
from server.fleet import GROUP, TAG, fleet_counts
from server.ingest import pending_labeled_samples
from server.pipeline.data_gate import quarantined_devices
from server.settings import ServerSettings

log = logging.getLogger(__name__)

MAX_LABELS = 500  # groups (and tags) the filters offer
MAX_MODELS = 20
MAX_JOBS = 10
MAX_ALERTS = 30
GALLERY_SIZE = 24
MAX_BOXES = 50
DAYS = 14
JOB_LOG_CHARS = 6000
ACTIVE_ROLLOUT_STATES = ("pending", "awaiting_approval", "running", "paused")
RECENT_FINISHED_ROLLOUTS = 10
AGREEMENT_BUCKET_S = 5
MAX_SHADOW_REPORTS = 5000


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def fleet_view(session: Session, settings: ServerSettings) -> dict[str, Any]:
    """The fleet's aggregates: devices by state, online per group, versions and update states, the
    groups and tags to filter by. No device rows: the dashboard pages the inventory with filters on
    the server (``GET /api/v1/devices``), so this topic is as small at 10,000 devices as at ten.
    ``last_seen`` changes whenever a device reports, which tells an open table to fetch its page again."""
    by_state, online_per_group = fleet_counts(session)
    total = sum(by_state.values())  # every device is online, offline or revoked
    labels = {kind: list(session.scalars(select(DeviceLabel.value).where(DeviceLabel.kind == kind).distinct()
                                         .order_by(DeviceLabel.value).limit(MAX_LABELS)))
              for kind in (GROUP, TAG)}
    live = Device.revoked.is_(False)

    def counted(column) -> dict[str, int]:
        return {("none" if v is None else str(v)): n for v, n in session.execute(
            select(column, func.count()).where(live).group_by(column).order_by(column))}

    return {"total": total, "by_state": by_state, "online_per_group": online_per_group,
            "groups": labels[GROUP], "tags": labels[TAG],
            "active_versions": counted(Device.active_version), "candidate_versions": counted(Device.candidate_version),
            "update_states": counted(Device.update_state),
            "last_seen": _iso(session.scalar(select(func.max(Device.last_seen))))}


def _model_item(m: ModelVersion, aliases: dict[int, list[str]]) -> dict[str, Any]:
    return {"version": m.version, "name": m.name, "status": m.status, "aliases": aliases.get(m.version, []),
            "created_at": _iso(m.created_at), "parent_version": m.parent_version, "snapshot_id": m.snapshot_id,
            "job_id": m.job_id, "metrics": m.metrics or {}, "gate": m.gate or {}, "reason": m.reason,
            "class_names": m.class_names or [], "imgsz": m.imgsz, "approved_by": m.approved_by,
            "approved_at": _iso(m.approved_at), "bundle_size": m.bundle_size}


def models_view(session: Session, settings: ServerSettings) -> dict[str, Any]:
    """The registry's recent versions with aliases, metrics per eval set and class, and gate results."""
    aliases = registry.aliases_of(session)
    rows = session.scalars(select(ModelVersion).order_by(ModelVersion.version.desc()).limit(MAX_MODELS)).all()
    prod = registry.production(session)
    by_alias = {name: version for version, names in aliases.items() for name in names}
    running = Counter(v for (v,) in session.execute(
        select(Device.active_version).where(Device.revoked.is_(False), Device.active_version.is_not(None))))
    rolling_out = None
    parts = _rollout_parts()
    if parts is not None:  # a version on its way out, not production yet: what a fleet rollback stops
        rollout = parts[0]
        rolling_out = session.scalar(select(rollout.version).where(rollout.state.in_(ACTIVE_ROLLOUT_STATES))
                                     .order_by(rollout.id.desc()).limit(1))
        if prod is not None and rolling_out == prod.version:
            rolling_out = None
    return {"production_version": prod.version if prod else None, "aliases": by_alias, "rolling_out": rolling_out,
            "class_names": list(settings.class_names), "devices_running": {str(k): n for k, n in running.items()},
            "items": [_model_item(m, aliases) for m in rows]}


def _boxes(boxes: list | None) -> list | None:
    if boxes is None:
        return None
    return [{k: b.get(k) for k in ("cls", "cx", "cy", "w", "h", "conf")} for b in boxes[:MAX_BOXES]
            if isinstance(b, dict)]


def data_view(session: Session, settings: ServerSettings) -> dict[str, Any]:
    """Samples toward the retrain threshold, rejects with reasons, samples per day, the recent frames
    with their predicted and corrected boxes, and quarantined devices."""
    by_status = dict(session.execute(select(Sample.status, func.count()).group_by(Sample.status)).all())
    reasons = session.execute(
        select(Sample.reject_reason, func.count()).where(Sample.status == "rejected")
        .group_by(Sample.reject_reason).order_by(func.count().desc()).limit(12)).all()
    rejects = session.scalars(select(Sample).where(Sample.status == "rejected")
                              .order_by(Sample.received_at.desc()).limit(20)).all()
    since = datetime.now(UTC) - timedelta(days=DAYS - 1)
    day = func.date(Sample.received_at)
    per_day: dict[str, dict[str, int]] = {}
    for d, status, n in session.execute(select(day, Sample.status, func.count()).where(
            Sample.received_at >= since.replace(hour=0, minute=0, second=0, microsecond=0))
            .group_by(day, Sample.status)):
        per_day.setdefault(str(d)[:10], {})[status] = n
    gallery = session.scalars(select(Sample).order_by(Sample.received_at.desc()).limit(GALLERY_SIZE)).all()
    active = quarantined_devices(session)
    held = dict(session.execute(select(Sample.device_id, func.count()).where(Sample.status == "held")
                                .group_by(Sample.device_id)).all())
    quarantines = session.scalars(select(Quarantine).order_by(Quarantine.id.desc()).limit(20)).all()
    return {
        "pending": pending_labeled_samples(session), "threshold": settings.retrain_threshold,
        "by_status": by_status,
        "reject_reasons": [{"reason": r or "(none given)", "count": n} for r, n in reasons],
        "rejects": [{"id": s.id, "device_id": s.device_id, "reason": s.reason, "reject_reason": s.reject_reason,
                     "received_at": _iso(s.received_at)} for s in rejects],
        "per_day": [{"day": k, **v} for k, v in sorted(per_day.items())],
        "gallery": [{"id": s.id, "device_id": s.device_id, "status": s.status, "reason": s.reason,
                     "reject_reason": s.reject_reason, "width": s.width, "height": s.height,
                     "model_version": s.model_version, "received_at": _iso(s.received_at),
                     "predictions": _boxes(s.predictions), "labels": _boxes(s.labels)} for s in gallery],
        "quarantined": sorted(active), "held_samples": held,
        "quarantines": [{"id": q.id, "device_id": q.device_id, "status": q.status,
                         "decided_at": _iso(q.decided_at), "decided_by": q.decided_by, "job_id": q.job_id,
                         "reasons": q.reasons, "released_by": q.released_by,
                         "released_at": _iso(q.released_at)} for q in quarantines],
    }


def pipeline_view(session: Session, settings: ServerSettings) -> dict[str, Any]:
    """Each recent retrain job's stages with timings, progress, log tail and outcome; and the batch the
    data contract halted, while nobody has resolved it, with its rejects (the first 200; the paged
    GET /api/v1/jobs/{id}/rejects has the rest): dropping them continues the loop."""
    from server.pipeline.data_gate import batch_rejects
    from server.pipeline.trigger import halted_job

    rows = session.scalars(select(TrainingJob).order_by(TrainingJob.id.desc()).limit(MAX_JOBS)).all()
    counts = dict(session.execute(select(TrainingJob.status, func.count()).group_by(TrainingJob.status)).all())
    halted = halted_job(session)
    return {"by_status": counts, "halted": batch_rejects(session, halted, limit=200) if halted else None, "jobs": [{
        "id": j.id, "trigger": j.trigger, "reason": j.reason, "requested_by": j.requested_by, "status": j.status,
        "stage": j.stage, "stages": j.stages or {}, "progress": j.progress or {}, "coalesced": j.coalesced,
        "snapshot_id": j.snapshot_id, "candidate_version": j.candidate_version, "created_at": _iso(j.created_at),
        "started_at": _iso(j.started_at), "finished_at": _iso(j.finished_at), "result": j.result or {},
        "log": (j.log or "")[-JOB_LOG_CHARS:]} for j in rows]}


def alerts_view(session: Session, settings: ServerSettings) -> dict[str, Any]:
    rows = session.scalars(select(AlertRecord).order_by(AlertRecord.id.desc()).limit(MAX_ALERTS)).all()
    total = session.scalar(select(func.count()).select_from(AlertRecord)) or 0
    return {"total": total, "items": [
        {"id": a.id, "at": _iso(a.at), "kind": a.kind, "severity": a.severity, "subject": a.subject,
         "message": a.message, "details": a.details or {}, "webhook_status": a.webhook_status} for a in rows]}


def drift_view(session: Session, settings: ServerSettings) -> dict[str, Any]:
    """Each device's and group's latest drift state, and the recent signals with what they triggered.
    The series with thresholds come from GET /api/v1/drift/{devices|groups}/{id}/windows."""
    try:
        from server.db.models import DriftEvent, DriftWindow
    except ImportError:  # a build without drift monitoring
        return {"enabled": False, "subjects": [], "events": []}
    latest = (select(DriftWindow.scope, DriftWindow.subject, func.max(DriftWindow.id).label("last_id"),
                     func.count().label("windows")).group_by(DriftWindow.scope, DriftWindow.subject).subquery())
    subjects = []
    for row, windows in session.execute(select(DriftWindow, latest.c.windows).join(
            latest, DriftWindow.id == latest.c.last_id).order_by(DriftWindow.id.desc()).limit(500)).all():
        metrics = (row.state or {}).get("metrics", {})
        subjects.append({"scope": row.scope, "subject": row.subject, "last_id": row.id, "last_at": _iso(row.at),
                         "windows": windows, "model_version": row.model_version, "status": row.status,
                         "drifting": row.drifting, "decayed": row.decayed,
                         "drifting_metrics": sorted(k for k, h in metrics.items() if h.get("active")),
                         "correction_rate": row.correction_rate})
    events = session.scalars(select(DriftEvent).order_by(DriftEvent.id.desc()).limit(30)).all()
    alerts = {a.id: a for a in session.scalars(select(AlertRecord).where(
        AlertRecord.id.in_([e.alert_id for e in events if e.alert_id is not None])))}
    jobs = {j.id: j for j in session.scalars(select(TrainingJob).where(
        TrainingJob.id.in_([e.job_id for e in events if e.job_id is not None])))}
    policy = getattr(settings, "drift", None)
    return {"enabled": bool(getattr(policy, "enabled", False)), "subjects": subjects, "events": [
        {"id": e.id, "at": _iso(e.at), "scope": e.scope, "subject": e.subject, "model_version": e.model_version,
         "signal": e.signal, "event": e.event, "action": e.action, "status": e.status, "detail": e.detail or {},
         "alert_id": e.alert_id, "job_id": e.job_id,
         "alert": ({"severity": a.severity, "kind": a.kind, "message": a.message}
                   if (a := alerts.get(e.alert_id)) else None),
         "job": ({"id": j.id, "status": j.status, "candidate_version": j.candidate_version}
                 if (j := jobs.get(e.job_id)) else None)} for e in events]}


def _rollout_parts():
    """The rollout controller's table and view function, when this build has them."""
    try:
        from server.db.models import Rollout, RolloutShadowReport
        from server.rollouts.api import rollout_dict
    except ImportError:
        return None
    return Rollout, RolloutShadowReport, rollout_dict


def _agreement_series(session: Session, report_model, rollout_ids: list[int]) -> dict[str, dict[str, Any]]:
    """Per active rollout, its devices' shadow windows of the last hour in ``AGREEMENT_BUCKET_S`` buckets:
    mean and lowest agreement with the active model, mean candidate p99 latency, frames compared."""
    if not rollout_ids:
        return {}
    since = datetime.now(UTC) - timedelta(hours=1)
    rows = session.execute(
        select(report_model.rollout_id, report_model.received_at, report_model.agreement,
               report_model.candidate_latency_ms_p99, report_model.frames)
        .where(report_model.rollout_id.in_(rollout_ids), report_model.received_at >= since)
        .order_by(report_model.received_at.desc()).limit(MAX_SHADOW_REPORTS)).all()
    buckets: dict[int, dict[int, list]] = {}
    for rollout_id, at, agreement, latency, frames in rows:
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        t = int(at.timestamp()) // AGREEMENT_BUCKET_S * AGREEMENT_BUCKET_S
        bucket = buckets.setdefault(rollout_id, {}).setdefault(t, [[], [], 0])
        if agreement is not None:
            bucket[0].append(agreement)
        if latency is not None:
            bucket[1].append(latency)
        bucket[2] += frames or 0
    out = {}
    for rollout_id, by_t in buckets.items():
        points = []
        for t in sorted(by_t):
            agreement, latency, frames = by_t[t]
            points.append([t, _mean(agreement), min(agreement) if agreement else None, _mean(latency), frames])
        out[str(rollout_id)] = {"columns": ["t", "agreement_mean", "agreement_min", "candidate_latency_ms_p99_mean",
                                            "frames"], "points": points}
    return out


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def rollouts_view(session: Session, settings: ServerSettings) -> dict[str, Any]:
    """Active rollouts and the recently finished ones, in the shape of GET /api/v1/rollouts/{id},
    and the shadow agreement of the active ones over the last hour."""
    parts = _rollout_parts()
    if parts is None:
        return {"available": False, "items": [], "agreement": {}}
    model, report_model, rollout_dict = parts
    active = session.scalars(select(model).where(model.state.in_(ACTIVE_ROLLOUT_STATES))
                             .order_by(model.id.desc())).all()
    finished = session.scalars(select(model).where(model.state.not_in(ACTIVE_ROLLOUT_STATES))
                               .order_by(model.id.desc()).limit(RECENT_FINISHED_ROLLOUTS)).all()
    items = [_jsonable(rollout_dict(session, rollout)) for rollout in [*active, *finished]]
    return {"available": True, "items": items,
            "agreement": _agreement_series(session, report_model, [r.id for r in active])}


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


Builder = Callable[[Session, ServerSettings], dict[str, Any]]

# topic -> (seconds between recomputations, builder). Rollouts are the quickest to move and to watch.
TOPICS: dict[str, tuple[float, Builder]] = {
    "rollouts": (1.0, rollouts_view),
    "fleet": (2.0, fleet_view),
    "pipeline": (2.0, pipeline_view),
    "alerts": (3.0, alerts_view),
    "data": (5.0, data_view),
    "models": (5.0, models_view),
    "drift": (5.0, drift_view),
}
