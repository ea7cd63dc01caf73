"""Registry and data-governance API: approval, rollback, lineage, snapshots, alerts, quarantines, imports."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from protocol.api import API_PREFIX
from server import audit, registry
from server.api.deps import client_address, get_context, json_form_field, require
from server.api.schemas import (
    DbId,
    ErrorResponse,
    FleetRollbackRequest,
    FleetRollbackResult,
    Offset,
    Page,
    RegistryActionRequest,
)
from server.auth import Principal, Role
from server.context import ServerContext
from server.db.models import AlertRecord, AliasChange, AuditEntry, ModelVersion, Quarantine, Sample, Snapshot
from server.importer import import_image, import_source
from server.pipeline.data_gate import quarantined_devices, release_quarantine
from server.pipeline.snapshot import SnapshotError, load_snapshot_manifest
from server.sample_validation import ImageLimits

router = APIRouter(prefix=API_PREFIX)

_REASONS = {404: "no such object", 409: "the action conflicts with the current state (reason in detail)",
            413: "too many files or too large", 422: "malformed input (reason in detail)"}


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse, "description": _REASONS[code]} for code in codes}


@router.post("/models/{version}/approve", responses=_errors(404, 409))
def approve_model(version: DbId, request: Request, body: RegistryActionRequest | None = None,
                  ctx: ServerContext = Depends(get_context),
                  who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    """Approve a candidate that passed its gate. Without auto-deploy it becomes production at once
    (the old one ``previous``); with auto-deploy it is ``approved`` and a rollout takes it to the
    fleet, whose completion makes it production."""
    with ctx.sessions() as session:
        try:
            mv = registry.approve(session, version, who.subject, promote_now=not ctx.settings.auto_deploy)
        except registry.RegistryError as exc:
            code = 404 if "does not exist" in str(exc) else 409
            raise HTTPException(code, str(exc)) from None
        status = mv.status
        audit.record(session, who.subject, "model.approve", f"version:{version}", client_address(request),
                     reason=body.reason if body else "")
        session.commit()
    if ctx.on_approved is not None:
        ctx.on_approved(version)
    return {"version": version, "status": status}


@router.post("/models/rollback", responses=_errors(404, 409), response_model=FleetRollbackResult)
def rollback_model(request: Request, body: FleetRollbackRequest | None = None,
                   ctx: ServerContext = Depends(get_context),
                   who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    """Roll the fleet back to a version (default: the production version before this one): the
    registry's production moves (rolling back twice goes back twice), the rollout in the way is
    rolled back, and every other device on another version gets a signed rollback command."""
    from server.fleet_rollback import FleetRollbackError, roll_fleet_back

    body = body or FleetRollbackRequest()
    with ctx.sessions() as session:
        try:
            result = roll_fleet_back(session, ctx.store, ctx.bus, ctx.signing_key, to_version=body.version,
                                     actor=who.subject, reason=body.reason, source=client_address(request),
                                     presign_seconds=ctx.settings.presign_seconds)
        except FleetRollbackError as exc:
            raise HTTPException(404 if "does not exist" in str(exc) else 409, str(exc)) from None
    if ctx.rollouts is not None and result["rollout_rolled_back"] is not None:
        ctx.rollouts.nudge()
    return result


class AliasMove(BaseModel):
    at: datetime
    alias: str = Field(description="production, previous or candidate")
    version: int | None = Field(description="where it points now (None: cleared)")
    from_version: int | None
    actor: str
    reason: str


@router.get("/aliases/history", responses=_errors(), response_model=Page[AliasMove])
def alias_history(limit: int = Query(100, ge=1, le=1000), offset: Offset = 0,
                  alias: str | None = Query(None, max_length=32, description="only this alias"),
                  ctx: ServerContext = Depends(get_context),
                  _: Principal = Depends(require(Role.VIEWER))) -> dict:
    """Every move of the registry's aliases, newest first: who moved production where, and why."""
    query = select(AliasChange)
    if alias:
        query = query.where(AliasChange.name == alias)
    with ctx.sessions() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery()))
        rows = session.scalars(query.order_by(AliasChange.id.desc()).limit(limit).offset(offset)).all()
        items = [{"at": r.at, "alias": r.name, "version": r.version, "from_version": r.from_version,
                  "actor": r.actor, "reason": r.reason} for r in rows]
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/models/{version}/lineage", responses=_errors(404))
def model_lineage(version: DbId, ctx: ServerContext = Depends(get_context),
                  _: Principal = Depends(require(Role.VIEWER))) -> dict:
    """Model → job → snapshot chain → images and the devices that sent them."""
    with ctx.sessions() as session:
        mv = session.get(ModelVersion, version)
        if mv is None:
            raise HTTPException(404, f"model version {version} does not exist")
        chain, snapshot_id = [], mv.snapshot_id
        while snapshot_id and len(chain) < 100:
            snap = session.get(Snapshot, snapshot_id)
            if snap is None:
                break
            devices = Counter(session.scalars(select(Sample.device_id).where(Sample.snapshot_id == snap.id)))
            chain.append({"id": snap.id, "created_at": snap.created_at, "samples": snap.sample_count,
                          "manifest_key": snap.manifest_key, "devices": dict(devices), "parent": snap.parent_id})
            snapshot_id = snap.parent_id
        return {"version": version, "parent_version": mv.parent_version, "job_id": mv.job_id,
                "approved_by": mv.approved_by, "approved_at": mv.approved_at,
                "hyperparameters": mv.hyperparameters, "artifacts": mv.artifacts, "snapshots": chain}


@router.get("/snapshots/{snapshot_id}", responses=_errors(404, 409))
def get_snapshot(snapshot_id: str, ctx: ServerContext = Depends(get_context),
                 _: Principal = Depends(require(Role.VIEWER)),
                 limit: int = Query(100, ge=1, le=1000), offset: Offset = 0) -> dict:
    with ctx.sessions() as session:
        snap = session.get(Snapshot, snapshot_id)
        if snap is None:
            raise HTTPException(404, f"snapshot {snapshot_id} does not exist")
    try:
        manifest = load_snapshot_manifest(ctx.store, snapshot_id)
    except SnapshotError as exc:
        raise HTTPException(409, str(exc)) from None
    samples = manifest["samples"]
    return {"id": snapshot_id, "parent": manifest["parent"], "total": len(samples), "limit": limit,
            "offset": offset, "items": samples[offset:offset + limit]}


@router.get("/alerts")
def list_alerts(ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.VIEWER)),
                kind: str | None = None, limit: int = Query(50, ge=1, le=500),
                offset: Offset = 0) -> dict:
    with ctx.sessions() as session:
        query = select(AlertRecord)
        count = select(func.count()).select_from(AlertRecord)
        if kind:
            query, count = query.where(AlertRecord.kind == kind), count.where(AlertRecord.kind == kind)
        rows = session.scalars(query.order_by(AlertRecord.id.desc()).limit(limit).offset(offset)).all()
        return {"total": session.scalar(count), "limit": limit, "offset": offset, "items": [
            {"id": a.id, "at": a.at, "kind": a.kind, "severity": a.severity, "subject": a.subject,
             "message": a.message, "details": a.details, "webhook_status": a.webhook_status} for a in rows]}


@router.get("/quarantines")
def list_quarantines(ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.VIEWER)),
                     limit: int = Query(50, ge=1, le=500), offset: Offset = 0) -> dict:
    """Devices whose labels are held back, their held sample counts, and the decisions (paginated)."""
    with ctx.sessions() as session:
        active = quarantined_devices(session)
        total = session.scalar(select(func.count()).select_from(Quarantine))
        rows = session.scalars(select(Quarantine).order_by(Quarantine.id.desc()).limit(limit).offset(offset)).all()
        held = dict(session.execute(select(Sample.device_id, func.count()).where(Sample.status == "held")
                                    .group_by(Sample.device_id)).all())
        return {"quarantined": sorted(active), "held_samples": held, "total": total, "limit": limit,
                "offset": offset, "items": [
            {"id": q.id, "device_id": q.device_id, "status": q.status, "decided_at": q.decided_at,
             "decided_by": q.decided_by, "job_id": q.job_id, "reasons": q.reasons, "evidence": q.evidence,
             "thresholds": q.thresholds} for q in rows]}


@router.post("/devices/{device_id}/quarantine/release", responses=_errors(409))
def release_device(device_id: str, request: Request, body: RegistryActionRequest | None = None,
                   ctx: ServerContext = Depends(get_context),
                   who: Principal = Depends(require(Role.ENGINEER))) -> dict:
    with ctx.sessions() as session:
        try:
            released = release_quarantine(session, device_id, who.subject)
        except LookupError as exc:
            raise HTTPException(409, str(exc)) from None
        audit.record(session, who.subject, "device.quarantine_release", f"device:{device_id}",
                     client_address(request), samples=released, reason=body.reason if body else "")
        session.commit()
    return {"device_id": device_id, "released_samples": released}


@router.post("/imports", responses=_errors(413, 422))
async def import_labeled_images(
    request: Request,
    source: str = Form(..., description="name of the imported dataset, e.g. cvat-line3-2026-11"),
    labels: str = Form(..., description='JSON list, one per file: [{"cls","cx","cy","w","h"}, ...]'),
    files: list[UploadFile] = File(...),
    ctx: ServerContext = Depends(get_context),
    who: Principal = Depends(require(Role.ENGINEER)),
) -> dict:
    """Labeled images (registered class ids) through the ingest checks; at most 256 per call."""
    try:
        source_id = import_source(source)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    per_file = json_form_field("labels", labels)
    if not isinstance(per_file, list) or len(per_file) != len(files):
        raise HTTPException(422, f"labels must be a JSON list with one entry per file ({len(files)} files)")
    if len(files) > 256:
        raise HTTPException(413, "at most 256 files per import call")
    s = ctx.settings
    limits = ImageLimits(max_bytes=s.max_sample_bytes, max_side=s.max_image_side, max_pixels=s.max_image_pixels)
    results = []
    with ctx.sessions() as session:
        for upload, boxes in zip(files, per_file, strict=True):
            data = await upload.read(s.max_sample_bytes + 1)
            if not isinstance(boxes, list):
                results.append({"file": upload.filename, "status": "rejected", "reason": "labels must be a list"})
                continue
            sample_id, status, reason = import_image(session, ctx.store, source_id, data, boxes, s.class_names,
                                                     limits)
            results.append({"file": upload.filename, "sample_id": sample_id, "status": status, "reason": reason})
        counts = Counter(r["status"] for r in results)
        audit.record(session, who.subject, "data.import", source_id, client_address(request), **counts)
        session.commit()
    return {"source": source_id, "counts": dict(counts), "items": results}


@router.get("/audit")
def list_audit(ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.OPERATOR)),
               action: str | None = None, actor: str | None = None,
               limit: int = Query(100, ge=1, le=1000), offset: Offset = 0) -> dict:
    """The append-only audit log, newest first: who did what, to what, from where."""
    with ctx.sessions() as session:
        query, count = select(AuditEntry), select(func.count()).select_from(AuditEntry)
        if action:
            query, count = query.where(AuditEntry.action == action), count.where(AuditEntry.action == action)
        if actor:
            query, count = query.where(AuditEntry.actor == actor), count.where(AuditEntry.actor == actor)
        rows = session.scalars(query.order_by(AuditEntry.id.desc()).limit(limit).offset(offset)).all()
        return {"total": session.scalar(count), "limit": limit, "offset": offset, "items": [
            {"id": e.id, "at": e.at, "actor": e.actor, "action": e.action, "target": e.target,
             "source": e.source, "detail": e.detail} for e in rows]}
