"""The JSON API under /api/v1."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from sqlalchemy import func, select

from protocol.api import API_PREFIX
from server import audit, registry
from server.api.deps import client_address, get_context, json_form_field, require
from server.api.schemas import (
    DbId,
    DeployRequest,
    ErrorResponse,
    HaltResolved,
    JobRejects,
    Offset,
    ResolveHaltRequest,
    RetrainRequest,
)
from server.auth import Principal, Role
from server.context import ServerContext
from server.db.models import AlertRecord, Deployment, Device, ModelVersion, Sample, TrainingJob
from server.deploy import CommandsNotSent, DeployError, deploy_version
from server.fleet import device_dict
from server.ingest import pending_labeled_samples
from server.pipeline.data_gate import HaltError, batch_rejects, quarantined_devices

router = APIRouter(prefix=API_PREFIX)

MAX_ARTIFACT_BYTES = 512 * 1024 * 1024


def _model_dict(m: ModelVersion, aliases: dict[int, list[str]]) -> dict:
    return {
        "version": m.version, "name": m.name, "status": m.status, "aliases": aliases.get(m.version, []),
        "created_at": m.created_at, "parent_version": m.parent_version, "snapshot_id": m.snapshot_id,
        "job_id": m.job_id, "metrics": m.metrics, "gate": m.gate, "hyperparameters": m.hyperparameters,
        "class_names": m.class_names, "imgsz": m.imgsz, "bundle_sha256": m.bundle_sha256,
        "bundle_size": m.bundle_size, "oci_image": m.oci_image, "reason": m.reason,
    }


def _job_dict(j: TrainingJob) -> dict:
    return {
        "id": j.id, "trigger": j.trigger, "reason": j.reason, "requested_by": j.requested_by,
        "status": j.status, "stage": j.stage, "stages": j.stages, "progress": j.progress,
        "coalesced": j.coalesced, "snapshot_id": j.snapshot_id, "candidate_version": j.candidate_version,
        "created_at": j.created_at, "started_at": j.started_at, "finished_at": j.finished_at,
        "result": j.result, "log": j.log[-4000:],
    }


# Device endpoints (enrollment, inventory, revocation, upload grants): server/api/fleet_routes.py


# ---------------------------------------------------------------------- models


@router.get("/models")
def list_models(ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.VIEWER)),
                limit: int = Query(50, ge=1, le=500), offset: Offset = 0) -> dict:
    with ctx.sessions() as session:
        aliases = registry.aliases_of(session)
        total = session.scalar(select(func.count()).select_from(ModelVersion))
        rows = session.scalars(
            select(ModelVersion).order_by(ModelVersion.version.desc()).limit(limit).offset(offset)).all()
        return {"total": total, "items": [_model_dict(m, aliases) for m in rows]}


@router.get("/models/{version}")
def get_model(version: DbId, ctx: ServerContext = Depends(get_context),
              _: Principal = Depends(require(Role.VIEWER))) -> dict:
    with ctx.sessions() as session:
        m = session.get(ModelVersion, version)
        if m is None:
            raise HTTPException(404, f"model version {version} does not exist")
        return _model_dict(m, registry.aliases_of(session))


async def _save_upload(upload: UploadFile, dest: Path) -> Path:
    size = 0
    with dest.open("wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > MAX_ARTIFACT_BYTES:
                raise HTTPException(413, f"{upload.filename} is over {MAX_ARTIFACT_BYTES} bytes")
            out.write(chunk)
    return dest


def _json_object(field: str, text: str) -> dict:
    value = json_form_field(field, text)
    if not isinstance(value, dict):
        raise HTTPException(422, f"{field} must be a JSON object, not {type(value).__name__}")
    return value


def _is_number(value) -> bool:
    try:
        return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(float(value))
    except OverflowError:  # an int past a float's range
        return False


@router.post("/models", status_code=201)
async def register_model(
    request: Request,
    weights: UploadFile = File(..., description="Ultralytics .pt weights"),
    onnx: UploadFile = File(..., description="the ONNX export that ships"),
    metrics: str = Form("{}", description="JSON: {eval set: {map50, map50_95, ...}}"),
    hyperparameters: str = Form("{}"),
    imgsz: int = Form(..., ge=32, le=1280),
    ctx: ServerContext = Depends(get_context),
    who: Principal = Depends(require(Role.ENGINEER)),
) -> dict:
    """Register an externally trained model (e.g. the seed) and make it production."""
    metrics_obj, hyper_obj = _json_object("metrics", metrics), _json_object("hyperparameters", hyperparameters)
    for eval_set, values in metrics_obj.items():
        scores = values if isinstance(values, dict) else {}
        for name in ("map50", "map50_95"):  # what goes into the bundle's manifest
            score = scores.get(name)
            if name in scores and not _is_number(score):
                raise HTTPException(422, f"metrics.{eval_set}.{name} must be a number, not {score!r}")
    with tempfile.TemporaryDirectory() as tmp:
        pt = await _save_upload(weights, Path(tmp) / "model.pt")
        onnx_path = await _save_upload(onnx, Path(tmp) / "model.onnx")
        version = ctx.publisher.register_external(
            pt=pt, onnx=onnx_path, imgsz=imgsz, metrics=metrics_obj, hyperparameters=hyper_obj,
            actor=who.subject, source=client_address(request), work_dir=Path(tmp),
        )
    return {"version": version}


# ---------------------------------------------------------------------- pipeline


@router.post("/retrain", status_code=202)
def retrain(body: RetrainRequest, request: Request, ctx: ServerContext = Depends(get_context),
            who: Principal = Depends(require(Role.ENGINEER))) -> dict:
    job = ctx.scheduler.request("manual", body.reason, who.subject)
    with ctx.sessions() as session:
        audit.record(session, who.subject, "retrain.request", f"job:{job.id}", client_address(request),
                     reason=body.reason)
        session.commit()
        return _job_dict(session.get(TrainingJob, job.id))


@router.get("/jobs")
def list_jobs(ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.VIEWER)),
              limit: int = Query(20, ge=1, le=200), offset: Offset = 0) -> dict:
    with ctx.sessions() as session:
        total = session.scalar(select(func.count()).select_from(TrainingJob))
        rows = session.scalars(select(TrainingJob).order_by(TrainingJob.id.desc()).limit(limit).offset(offset))
        return {"total": total, "items": [_job_dict(j) for j in rows]}


@router.get("/jobs/{job_id}")
def get_job(job_id: DbId, ctx: ServerContext = Depends(get_context),
            _: Principal = Depends(require(Role.VIEWER))) -> dict:
    with ctx.sessions() as session:
        job = session.get(TrainingJob, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} does not exist")
        return _job_dict(job)


_JOB_NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such job"}}


@router.get("/jobs/{job_id}/rejects", response_model=JobRejects, responses=_JOB_NOT_FOUND)
def get_job_rejects(job_id: DbId, ctx: ServerContext = Depends(get_context),
                    _: Principal = Depends(require(Role.VIEWER)),
                    limit: int = Query(100, ge=1, le=1000), offset: Offset = 0) -> JobRejects:
    """The samples the data contract rejected in a job's batch (device, reason, status now), and its halt."""
    with ctx.sessions() as session:
        job = session.get(TrainingJob, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} does not exist")
        return JobRejects(**batch_rejects(session, job, limit, offset), limit=limit, offset=offset)


@router.post("/jobs/{job_id}/resolve-halt", response_model=HaltResolved, responses={
    **_JOB_NOT_FOUND, 409: {"model": ErrorResponse, "description": "the job did not halt, or its halt was resolved"}})
def resolve_job_halt(job_id: DbId, body: ResolveHaltRequest, request: Request,
                     ctx: ServerContext = Depends(get_context),
                     who: Principal = Depends(require(Role.OPERATOR))) -> HaltResolved:
    """Drop the rejects of a batch the data contract halted and queue the retrain that continues it (audited)."""
    with ctx.sessions() as session:
        if session.get(TrainingJob, job_id) is None:
            raise HTTPException(404, f"job {job_id} does not exist")
    try:
        dropped, queued = ctx.scheduler.resolve_halt(job_id, who.subject, body.reason, client_address(request))
    except HaltError as exc:
        raise HTTPException(409, str(exc)) from None
    return HaltResolved(job_id=job_id, dropped=dropped, status="resolved", next_job_id=queued.id,
                        next_job_status=queued.status)


@router.get("/samples")
def list_samples(ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.VIEWER)),
                 status_: str | None = Query(None, alias="status"), limit: int = Query(50, ge=1, le=500),
                 offset: Offset = 0) -> dict:
    with ctx.sessions() as session:
        query = select(Sample)
        if status_:
            query = query.where(Sample.status == status_)
        total = session.scalar(select(func.count()).select_from(query.subquery()))
        rows = session.scalars(query.order_by(Sample.received_at.desc()).limit(limit).offset(offset))
        return {"total": total, "items": [
            {"id": s.id, "device_id": s.device_id, "status": s.status, "reject_reason": s.reject_reason,
             "reason": s.reason, "object_key": s.object_key, "received_at": s.received_at,
             "snapshot_id": s.snapshot_id} for s in rows]}


# ---------------------------------------------------------------------- deployments


@router.post("/deployments", status_code=202)
def create_deployment(body: DeployRequest, request: Request, ctx: ServerContext = Depends(get_context),
                      who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    if ctx.bus is None:
        raise HTTPException(503, "the server is not connected to the MQTT broker")
    with ctx.sessions() as session:
        version = body.version
        if version == "production":
            prod = registry.production(session)
            if prod is None:
                raise HTTPException(409, "there is no production model to deploy")
            version = prod.version
        try:
            sent = deploy_version(
                session, ctx.store, ctx.bus, version, body.devices, mode=body.mode,
                shadow_frames=body.shadow_frames or ctx.settings.shadow_frames,
                presign_seconds=ctx.settings.presign_seconds, actor=who.subject,
            )
        except CommandsNotSent as exc:  # recorded, not all sent: the broker, not the request, is at fault
            raise HTTPException(503, str(exc)) from None
        except DeployError as exc:
            raise HTTPException(409, str(exc)) from None
        audit.record(session, who.subject, "deployment.create", f"version:{version}", client_address(request))
        session.commit()
        return {"version": version, "devices": [d.device_id for d in sent],
                "commands": [d.command_id for d in sent]}


@router.get("/deployments")
def list_deployments(ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.VIEWER)),
                     limit: int = Query(100, ge=1, le=1000), offset: Offset = 0) -> dict:
    with ctx.sessions() as session:
        total = session.scalar(select(func.count()).select_from(Deployment))
        rows = session.scalars(select(Deployment).order_by(Deployment.id.desc()).limit(limit).offset(offset))
        return {"total": total, "items": [
            {"id": d.id, "device_id": d.device_id, "version": d.version, "mode": d.mode, "state": d.state,
             "reason": d.reason, "shadow": d.shadow, "created_at": d.created_at, "updated_at": d.updated_at}
            for d in rows]}


# ---------------------------------------------------------------------- overview


def overview(ctx: ServerContext) -> dict:
    with ctx.sessions() as session:
        aliases = registry.aliases_of(session)
        devices = session.scalars(select(Device).order_by(Device.id)).all()
        models = session.scalars(select(ModelVersion).order_by(ModelVersion.version.desc()).limit(20)).all()
        jobs = session.scalars(select(TrainingJob).order_by(TrainingJob.id.desc()).limit(5)).all()
        counts = dict(session.execute(select(Sample.status, func.count()).group_by(Sample.status)).all())
        prod = registry.production(session)
        return {
            "devices": [device_dict(d) for d in devices],
            "samples": {"pending": pending_labeled_samples(session), "threshold": ctx.settings.retrain_threshold,
                        "by_status": counts},
            "production_version": prod.version if prod else None,
            "models": [_model_dict(m, aliases) for m in models],
            "jobs": [_job_dict(j) for j in jobs],
            "alerts": [{"id": a.id, "at": a.at, "kind": a.kind, "severity": a.severity, "subject": a.subject,
                        "message": a.message} for a in session.scalars(
                            select(AlertRecord).order_by(AlertRecord.id.desc()).limit(10))],
            "quarantined": sorted(quarantined_devices(session)),
        }


@router.get("/overview")
def get_overview(ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.VIEWER))) -> dict:
    return overview(ctx)
