"""Registry and data-governance API: approval, rollback, lineage, snapshots, alerts, quarantines."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlalchemy import func, select

from protocol.api import API_PREFIX
from server import audit, registry
from server.api.deps import client_address, get_context, require
from server.api.schemas import RegistryActionRequest
from server.auth import Principal, Role
from server.context import ServerContext
from server.db.models import AlertRecord, ModelVersion, Quarantine, Sample, Snapshot
from server.pipeline.data_gate import quarantined_devices, release_quarantine
from server.pipeline.snapshot import SnapshotError, load_snapshot_manifest

router = APIRouter(prefix=API_PREFIX)


@router.post("/models/{version}/approve")
def approve_model(version: int, request: Request, body: RegistryActionRequest | None = None,
                  ctx: ServerContext = Depends(get_context),
                  who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    """Approve a candidate that passed its gate: it becomes production, the old one ``previous``."""
    with ctx.sessions() as session:
        try:
            registry.approve(session, version, who.subject)
        except registry.RegistryError as exc:
            code = 404 if "does not exist" in str(exc) else 409
            raise HTTPException(code, str(exc)) from None
        audit.record(session, who.subject, "model.approve", f"version:{version}", client_address(request),
                     reason=body.reason if body else "")
        session.commit()
    if ctx.on_promoted is not None:
        ctx.on_promoted(version)
    return {"version": version, "status": "production"}


@router.post("/models/rollback")
def rollback_model(request: Request, body: RegistryActionRequest | None = None,
                   ctx: ServerContext = Depends(get_context),
                   who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    """One call: ``previous`` becomes production again, the rolled-back version is marked so."""
    with ctx.sessions() as session:
        try:
            from_version, to_version = registry.rollback(session)
        except registry.RegistryError as exc:
            raise HTTPException(409, str(exc)) from None
        audit.record(session, who.subject, "model.rollback", f"version:{from_version}", client_address(request),
                     to_version=to_version, reason=body.reason if body else "")
        session.commit()
    return {"from_version": from_version, "to_version": to_version}


@router.get("/models/{version}/lineage")
def model_lineage(version: int, ctx: ServerContext = Depends(get_context),
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


@router.get("/snapshots/{snapshot_id}")
def get_snapshot(snapshot_id: str, ctx: ServerContext = Depends(get_context),
                 _: Principal = Depends(require(Role.VIEWER)),
                 limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict:
    with ctx.sessions() as session:
        snap = session.get(Snapshot, snapshot_id)
        if snap is None:
            raise HTTPException(404, f"snapshot {snapshot_id} does not exist")
    try:
        manifest = load_snapshot_manifest(ctx.store, snapshot_id)
    except SnapshotError as exc:
        raise HTTPException(409, str(exc)) from None
    samples = manifest["samples"]
    return {"id": snapshot_id, "parent": manifest["parent"], "total": len(samples),
            "items": samples[offset:offset + limit]}


@router.get("/alerts")
def list_alerts(ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.VIEWER)),
                kind: str | None = None, limit: int = Query(50, ge=1, le=500),
                offset: int = Query(0, ge=0)) -> dict:
    with ctx.sessions() as session:
        query = select(AlertRecord)
        count = select(func.count()).select_from(AlertRecord)
        if kind:
            query, count = query.where(AlertRecord.kind == kind), count.where(AlertRecord.kind == kind)
        rows = session.scalars(query.order_by(AlertRecord.id.desc()).limit(limit).offset(offset)).all()
        return {"total": session.scalar(count), "items": [
            {"id": a.id, "at": a.at, "kind": a.kind, "severity": a.severity, "subject": a.subject,
             "message": a.message, "details": a.details, "webhook_status": a.webhook_status} for a in rows]}


@router.get("/quarantines")
def list_quarantines(ctx: ServerContext = Depends(get_context),
                     _: Principal = Depends(require(Role.VIEWER))) -> dict:
    with ctx.sessions() as session:
        active = quarantined_devices(session)
        rows = session.scalars(select(Quarantine).order_by(Quarantine.id.desc()).limit(500)).all()
        held = dict(session.execute(select(Sample.device_id, func.count()).where(Sample.status == "held")
                                    .group_by(Sample.device_id)).all())
        return {"quarantined": sorted(active), "held_samples": held, "decisions": [
            {"id": q.id, "device_id": q.device_id, "status": q.status, "decided_at": q.decided_at,
             "decided_by": q.decided_by, "job_id": q.job_id, "reasons": q.reasons, "evidence": q.evidence,
             "thresholds": q.thresholds} for q in rows]}


@router.post("/devices/{device_id}/quarantine/release")
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
