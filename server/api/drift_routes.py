"""Drift API: what the dashboard draws -- drift over time per device and group with the thresholds,
the signals raised and cleared and what each triggered -- and the model versions' references.

* ``GET /drift/overview`` -- the policy (thresholds per metric, hysteresis, decay limits), every
  subject's latest state, counts; one call for a dashboard panel.
* ``GET /drift/subjects`` -- devices and groups with drift windows, latest state first (paged).
* ``GET /drift/devices/{id}/windows``, ``GET /drift/groups/{name}/windows`` -- the time series:
  per window the statistic each metric's threshold uses (``values``), all three statistics
  (``scores``), the decay figures, and the thresholds to draw (paged, oldest first within a page).
* ``GET /drift/events`` -- raised/cleared signals and each action (alert, sampling, retrain,
  rollback) with its outcome, the alert it fired and the training job it queued (paged, newest first).
* ``GET /drift/references``, ``GET /drift/references/{version}``, ``POST /drift/references/{version}``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import func, select

from protocol.api import API_PREFIX
from server import audit
from server.api.deps import get_context, require
from server.api.schemas import DbId, ErrorResponse, Offset
from server.auth import Principal, Role
from server.context import ServerContext
from server.db.models import AlertRecord, DriftEvent, DriftReference, DriftWindow, ModelVersion, TrainingJob
from server.settings import DriftPolicy

router = APIRouter(prefix=f"{API_PREFIX}/drift", tags=["drift"])
Scope = Literal["device", "group"]
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such subject or model version"}}


class Threshold(BaseModel):
    statistic: str
    raise_above: float
    clear_below: float


class PolicyView(BaseModel):
    """The thresholds to draw and the rules behind them."""

    enabled: bool
    default: Threshold
    thresholds: dict[str, Threshold]
    raise_after: int
    clear_after: int
    min_count: int
    decay: dict[str, float]
    actions: dict[str, Any]
    groups: dict[str, list[str]]


class SubjectView(BaseModel):
    scope: str
    subject: str
    model_version: int | None
    last_at: datetime
    windows: int
    status: str
    drifting: bool
    decayed: bool
    drifting_metrics: list[str]
    decay: dict[str, Any]


class WindowPoint(BaseModel):
    id: int
    at: datetime
    window: int
    model_version: int | None
    frames: int
    status: str  # scored | no_reference
    component: str | None
    drifting: bool
    decayed: bool
    drifting_metrics: list[str]
    values: dict[str, float]  # per metric: the statistic its threshold is on
    scores: dict[str, dict[str, float]]  # per metric: psi, ks, wasserstein, count
    correction_rate: float | None
    decay: dict[str, Any]


class WindowSeries(BaseModel):
    scope: str
    subject: str
    thresholds: dict[str, Threshold]  # every metric in the page
    decay_thresholds: dict[str, float]
    total: int
    limit: int
    offset: int
    items: list[WindowPoint]


class EventView(BaseModel):
    id: int
    at: datetime
    scope: str
    subject: str
    model_version: int | None
    signal: str
    event: str
    action: str
    status: str
    detail: dict[str, Any]
    alert: dict[str, Any] | None
    job: dict[str, Any] | None


class ReferenceView(BaseModel):
    model_version: int
    status: str
    created_at: datetime
    frames: int
    stats_version: int
    object_key: str
    source: dict[str, Any]
    error: str


def _policy_view(policy: DriftPolicy) -> PolicyView:
    return PolicyView(
        enabled=policy.enabled, default=Threshold(**policy.threshold.model_dump()),
        thresholds={k: Threshold(**v.model_dump()) for k, v in policy.thresholds.items()},
        raise_after=policy.raise_after, clear_after=policy.clear_after, min_count=policy.min_count,
        decay=_decay_thresholds(policy),
        actions={"alert": policy.alert, "boost_sampling": policy.boost_sampling,
                 "boost_random_rate": policy.boost_random_rate, "normal_random_rate": policy.normal_random_rate,
                 "retrain_on_drift": policy.retrain_on_drift, "retrain_on_decay": policy.retrain_on_decay,
                 "retrain_min_samples": policy.retrain_min_samples, "rollback_on_decay": policy.rollback_on_decay,
                 "rollback_within_windows": policy.rollback_within_windows},
        groups=policy.groups)


def _decay_thresholds(policy: DriftPolicy) -> dict[str, float]:
    return {"max_correction_rate": policy.max_correction_rate, "clear_correction_rate": policy.clear_correction_rate,
            "min_confidence_ratio": policy.min_confidence_ratio,
            "clear_confidence_ratio": policy.clear_confidence_ratio,
            "min_detection_rate_ratio": policy.min_detection_rate_ratio,
            "clear_detection_rate_ratio": policy.clear_detection_rate_ratio}


def _drifting_metrics(row: DriftWindow) -> list[str]:
    metrics = (row.state or {}).get("metrics", {})
    return sorted(name for name, h in metrics.items() if h.get("active"))


def _subject_view(row: DriftWindow, windows: int) -> SubjectView:
    return SubjectView(scope=row.scope, subject=row.subject, model_version=row.model_version, last_at=row.at,
                       windows=windows, status=row.status, drifting=row.drifting, decayed=row.decayed,
                       drifting_metrics=_drifting_metrics(row), decay=row.decay or {})


def _latest_rows(session, scope: Scope | None):
    """Each subject's latest window, newest first, with its window count."""
    latest = select(DriftWindow.scope, DriftWindow.subject, func.max(DriftWindow.id).label("last_id"),
                    func.count().label("windows")).group_by(DriftWindow.scope, DriftWindow.subject)
    if scope is not None:
        latest = latest.where(DriftWindow.scope == scope)
    latest = latest.subquery()
    return select(DriftWindow, latest.c.windows).join(latest, DriftWindow.id == latest.c.last_id).order_by(
        DriftWindow.id.desc())


@router.get("/overview", response_model=dict)
def drift_overview(ctx: ServerContext = Depends(get_context),
                   _: Principal = Depends(require(Role.VIEWER))) -> dict:
    """The policy with its thresholds, every subject's latest state, and what is raised now."""
    with ctx.sessions() as session:
        subjects = [_subject_view(row, n) for row, n in session.execute(_latest_rows(session, None)).all()]
        references = dict(session.execute(select(DriftReference.status, func.count()).group_by(
            DriftReference.status)).all())
        events = session.scalar(select(func.count()).select_from(DriftEvent)) or 0
    return {"policy": _policy_view(ctx.settings.drift).model_dump(),
            "subjects": [s.model_dump(mode="json") for s in subjects],
            "drifting": [f"{s.scope}:{s.subject}" for s in subjects if s.drifting],
            "decayed": [f"{s.scope}:{s.subject}" for s in subjects if s.decayed],
            "references": references, "events": events}


@router.get("/subjects", response_model=dict)
def drift_subjects(scope: Scope | None = None, limit: int = Query(100, ge=1, le=1000), offset: Offset = 0,
                   ctx: ServerContext = Depends(get_context),
                   _: Principal = Depends(require(Role.VIEWER))) -> dict:
    """Devices and groups that have drift windows, most recently reported first."""
    with ctx.sessions() as session:
        rows = session.execute(_latest_rows(session, scope)).all()
    items = [_subject_view(row, n).model_dump(mode="json") for row, n in rows]
    return {"total": len(items), "limit": limit, "offset": offset, "items": items[offset:offset + limit]}


def _series(ctx: ServerContext, scope: Scope, subject: str, metrics: list[str] | None, since: datetime | None,
            limit: int, offset: int) -> WindowSeries:
    policy = ctx.settings.drift
    with ctx.sessions() as session:
        query = select(DriftWindow).where(DriftWindow.scope == scope, DriftWindow.subject == subject)
        if since is not None:
            query = query.where(DriftWindow.at >= since)
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        if total == 0 and since is None:
            raise HTTPException(404, f"no drift windows for {scope} {subject!r}")
        # Newest page first (offset 0 = the latest windows), returned oldest first for plotting.
        rows = list(reversed(session.scalars(query.order_by(DriftWindow.id.desc()).limit(limit).offset(offset)).all()))
    items, seen = [], set()
    for row in rows:
        scores = (row.scores or {}).get("metrics", {})
        if metrics:
            scores = {k: v for k, v in scores.items() if k in metrics}
        seen.update(scores)
        values = {k: float(v[policy.threshold_for(k).statistic]) for k, v in scores.items()}
        items.append(WindowPoint(
            id=row.id, at=row.at, window=row.window, model_version=row.model_version, frames=row.frames,
            status=row.status, component=(row.scores or {}).get("component"), drifting=row.drifting,
            decayed=row.decayed, drifting_metrics=_drifting_metrics(row), values=values, scores=scores,
            correction_rate=row.correction_rate, decay=row.decay or {}))
    return WindowSeries(scope=scope, subject=subject,
                        thresholds={k: Threshold(**policy.threshold_for(k).model_dump()) for k in sorted(seen)},
                        decay_thresholds=_decay_thresholds(policy), total=total, limit=limit, offset=offset,
                        items=items)


@router.get("/devices/{device_id}/windows", response_model=WindowSeries, responses=_NOT_FOUND)
def device_drift_windows(device_id: str, metric: list[str] | None = Query(None), since: datetime | None = None,
                         limit: int = Query(500, ge=1, le=5000), offset: Offset = 0,
                         ctx: ServerContext = Depends(get_context),
                         _: Principal = Depends(require(Role.VIEWER))) -> WindowSeries:
    """A device's drift over time: per window and metric the scored statistic, with the thresholds."""
    return _series(ctx, "device", device_id, metric, since, limit, offset)


@router.get("/groups/{group}/windows", response_model=WindowSeries, responses=_NOT_FOUND)
def group_drift_windows(group: str, metric: list[str] | None = Query(None), since: datetime | None = None,
                        limit: int = Query(500, ge=1, le=5000), offset: Offset = 0,
                        ctx: ServerContext = Depends(get_context),
                        _: Principal = Depends(require(Role.VIEWER))) -> WindowSeries:
    """A group's drift over time (its members' windows summed per round), with the thresholds."""
    return _series(ctx, "group", group, metric, since, limit, offset)


@router.get("/events", response_model=dict)
def drift_events(scope: Scope | None = None, subject: str | None = None,
                 signal: Literal["drift", "decay"] | None = None, action: str | None = None,
                 limit: int = Query(100, ge=1, le=1000), offset: Offset = 0,
                 ctx: ServerContext = Depends(get_context),
                 _: Principal = Depends(require(Role.VIEWER))) -> dict:
    """Signals raised and cleared, and each action they triggered: the alert it fired, the sampling
    command, the retrain job it queued (or why it waited), the rollback it sent."""
    with ctx.sessions() as session:
        query = select(DriftEvent)
        for column, value in ((DriftEvent.scope, scope), (DriftEvent.subject, subject),
                              (DriftEvent.signal, signal), (DriftEvent.action, action)):
            if value is not None:
                query = query.where(column == value)
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(query.order_by(DriftEvent.id.desc()).limit(limit).offset(offset)).all()
        alerts = {a.id: a for a in session.scalars(select(AlertRecord).where(
            AlertRecord.id.in_([r.alert_id for r in rows if r.alert_id is not None])))}
        jobs = {j.id: j for j in session.scalars(select(TrainingJob).where(
            TrainingJob.id.in_([r.job_id for r in rows if r.job_id is not None])))}
        items = [EventView(
            id=r.id, at=r.at, scope=r.scope, subject=r.subject, model_version=r.model_version, signal=r.signal,
            event=r.event, action=r.action, status=r.status, detail=r.detail or {},
            alert=({"id": a.id, "kind": a.kind, "severity": a.severity, "message": a.message,
                    "webhook_status": a.webhook_status} if (a := alerts.get(r.alert_id)) else None),
            job=({"id": j.id, "status": j.status, "trigger": j.trigger, "coalesced": j.coalesced,
                  "candidate_version": j.candidate_version} if (j := jobs.get(r.job_id)) else None),
        ).model_dump(mode="json") for r in rows]
    return {"total": total, "limit": limit, "offset": offset, "items": items}


def _reference_view(row: DriftReference) -> ReferenceView:
    return ReferenceView(model_version=row.model_version, status=row.status, created_at=row.created_at,
                         frames=row.frames, stats_version=row.stats_version, object_key=row.object_key,
                         source=row.source or {}, error=row.error)


@router.get("/references", response_model=dict)
def drift_references(limit: int = Query(100, ge=1, le=1000), offset: Offset = 0,
                     ctx: ServerContext = Depends(get_context),
                     _: Principal = Depends(require(Role.VIEWER))) -> dict:
    """Model versions' drift references (computed once per version, stored beside its artifacts)."""
    with ctx.sessions() as session:
        total = session.scalar(select(func.count()).select_from(DriftReference)) or 0
        rows = session.scalars(select(DriftReference).order_by(DriftReference.model_version.desc())
                               .limit(limit).offset(offset)).all()
        items = [_reference_view(r).model_dump(mode="json") for r in rows]
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/references/{version}", response_model=dict, responses=_NOT_FOUND)
def drift_reference(version: DbId, ctx: ServerContext = Depends(get_context),
                    _: Principal = Depends(require(Role.VIEWER))) -> dict:
    """One version's reference row and, when ready, its histograms per component."""
    with ctx.sessions() as session:
        row = session.get(DriftReference, version)
        if row is None:
            raise HTTPException(404, f"model version {version} has no drift reference")
        view = _reference_view(row).model_dump(mode="json")
    reference = ctx.drift.references.get(version) if row.status == "ready" else None
    components = ({name: {"frames": c.frames, "histograms": {k: h.model_dump() for k, h in c.histograms.items()}}
                   for name, c in reference.components.items()} if reference else {})
    return {**view, "components": components}


@router.post("/references/{version}", status_code=202, response_model=dict, responses=_NOT_FOUND)
def rebuild_drift_reference(version: DbId, ctx: ServerContext = Depends(get_context),
                            who: Principal = Depends(require(Role.ENGINEER))) -> dict:
    """(Re)compute a version's reference in the background (its training data changed, or it failed)."""
    with ctx.sessions() as session:
        if session.get(ModelVersion, version) is None:
            raise HTTPException(404, f"model version {version} does not exist")
        audit.record(session, who.subject, "drift.reference", f"version:{version}")
        session.commit()
    queued = ctx.drift.references.request(version, force=True)
    return {"model_version": version, "queued": queued}
