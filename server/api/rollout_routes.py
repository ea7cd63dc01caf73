"""Rollout API: create (operator), list and inspect (viewer), approve / pause / resume / abort /
roll back (operator). Every mutating call is audited; the controller is nudged after each."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from protocol.api import API_PREFIX
from server.api.deps import client_address, get_context, require
from server.api.schemas import DbId, ErrorResponse, Offset, Page
from server.auth import Principal, Role
from server.context import ServerContext
from server.db.models import Rollout
from server.rollouts import api
from server.rollouts.spec import RolloutAction, RolloutCreate, RolloutState

router = APIRouter(prefix=API_PREFIX, tags=["rollouts"])

_REASONS = {404: "no such rollout or model version", 409: "the rollout's state does not allow it (reason in detail)",
            422: "malformed request (reason in detail)"}


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse, "description": _REASONS[code]} for code in codes}


class EvidenceInfo(BaseModel):
    """What the sequential accuracy decision (paired_accuracy) saw and decided."""

    decision: str = Field(description="pass, fail or wait")
    test: str = Field(description="superiority, non-inferiority, inferiority, or empty while undecided")
    known: int = Field(description="known-truth frames both models ran on, pooled over the wave")
    candidate_only: int = Field(description="frames only the candidate got right")
    active_only: int = Field(description="frames only the active model got right")
    look: int = Field(description="the deciding look (or looks taken so far)")
    p_value: float | None = None
    level: float | None = Field(None, description="the per-look level the p-value or bound was held to")
    upper_bound: float | None = Field(None, description="non-inferiority: bound on the accuracy loss")


class GateInfo(BaseModel):
    name: str = Field(description="the GateConfig field it checks, e.g. min_agreement")
    value: float | None = Field(description="current value (None: not measured yet)")
    threshold: float | None
    passed: bool | None = Field(description="None: not measured yet")
    detail: str = ""
    evidence: EvidenceInfo | None = Field(None, description="paired_accuracy only: the decision's figures")


class ShadowInfo(BaseModel):
    windows: int
    frames: int
    agreement: float | None = Field(description="symmetric, over both models' confident boxes (shown, not gated)")
    confident_agreement: float | None = Field(description="where the active model is confident (gated)")
    corrected_frames: int
    active_accuracy: float | None
    candidate_accuracy: float | None
    candidate_only_correct: int = Field(0, description="known frames only the candidate got right")
    active_only_correct: int = Field(0, description="known frames only the active model got right")
    active_latency_ms_p99: float | None = None
    candidate_latency_ms_p99: float | None
    errors: int


class RolloutDeviceInfo(BaseModel):
    device_id: str
    state: Literal["pending", "deploying", "shadowing", "promoting", "active", "failed", "aborting", "aborted",
                   "rolling_back", "rolled_back"]
    goal: Literal["shadow", "switch", "stop", "revert"]
    attempt: int
    failure: str | None = Field(description="why it counts as a failed install, if it does")
    reason: str = Field(description="the failure, else the device's last reason")
    from_version: int | None
    active_version: int | None
    candidate_version: int | None
    online: bool
    update_state: str = Field(description="the agent's OTA state for this rollout's deploy")
    rollback_state: str
    assigned_at: datetime | None
    shadow_started_at: datetime | None
    updated_at: datetime | None
    shadow: ShadowInfo | None


class Verdict(BaseModel):
    outcome: Literal["pass", "fail", "wait"]
    reason: str


class WaveInfo(BaseModel):
    index: int
    name: str
    percent: float | None
    count: int | None
    target: int = Field(description="devices in the wave")
    state: Literal["pending", "running", "passed", "failed"]
    phase: Literal["shadow", "switch"] | None
    attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    reason: str
    device_counts: dict[str, int]
    gates: list[GateInfo]
    verdict: Verdict | None = Field(description="the running wave's current verdict")
    verdict_at: datetime | None = Field(None, description="when the verdict shown was reached: the rollout "
                                                          "controller's last pass, or this request")
    devices: list[RolloutDeviceInfo] | None = Field(None, description="only on GET /rollouts/{id}")


class OfflineCheck(BaseModel):
    name: str = Field(description="golden, new_data, or a device's or class's recall slice")
    metric: str = Field(description="map50_95 or recall")
    candidate: float
    production: float
    threshold: float
    passed: bool


class OfflineEvidence(BaseModel):
    """What the version's offline gate measured before any device saw it: the golden set, the
    new-data split and the per-device and per-class recall slices, against its parent version."""

    parent_version: int | None
    passed: bool | None = Field(description="None: no gate ran (a registered external model)")
    reasons: list[str]
    checks: list[OfflineCheck]


class RolloutInfo(BaseModel):
    id: int
    version: int
    state: RolloutState
    mode: Literal["shadow_then_switch", "direct"]
    on_failure: Literal["pause", "abort"]
    require_approval: bool
    selector: dict[str, Any]
    gates: dict[str, Any] = Field(description="the GateConfig this rollout is held to")
    shadow_frames: int
    created_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    settled: bool = Field(description="a finished rollout whose devices are where it left them")
    current_wave: int
    reason: str
    offline_evidence: OfflineEvidence | None = Field(description="the version's offline gate, beside the waves")
    waves: list[WaveInfo]


def _raise(exc: api.RolloutError):
    raise HTTPException(exc.status, exc.reason) from None


def _nudge(ctx: ServerContext) -> None:
    if ctx.rollouts is not None:
        ctx.rollouts.nudge()


@router.post("/rollouts", response_model=RolloutInfo, status_code=201, summary="Start a rollout (operator)",
             responses=_errors(404, 409))
def create_rollout(body: RolloutCreate, request: Request, ctx: ServerContext = Depends(get_context),
                   who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    """A registry version (or "production") to the devices the selector matches, in waves, each
    gated on its devices' shadow reports. Fields left out take the server's rollout policy."""
    with ctx.sessions() as session:
        try:
            rollout = api.create_rollout(session, body, ctx.settings.rollouts, actor=who.subject,
                                         source=client_address(request))
        except api.RolloutError as exc:
            _raise(exc)
        _nudge(ctx)
        return api.rollout_dict(session, rollout)


@router.get("/rollouts", response_model=Page[RolloutInfo], summary="List rollouts, newest first",
            responses=_errors(422))
def list_rollouts(ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.VIEWER)),
                  state: RolloutState | None = Query(None),
                  limit: int = Query(20, ge=1, le=200), offset: Offset = 0) -> dict:
    """Items carry each wave's gates and device counts by state; the device lists are on GET /rollouts/{id}."""
    with ctx.sessions() as session:
        return api.list_rollouts(session, state=state, limit=limit, offset=offset)


@router.get("/rollouts/{rollout_id}", response_model=RolloutInfo, summary="One rollout with its waves and devices",
            responses=_errors(404))
def get_rollout(rollout_id: DbId, ctx: ServerContext = Depends(get_context),
                _: Principal = Depends(require(Role.VIEWER)),
                devices: bool = Query(True, description="each wave's devices with their state and shadow "
                                                        "figures; false: the waves' counts and gates only "
                                                        "(what a poller of a 10,000-device rollout wants)")
                ) -> dict:
    with ctx.sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            raise HTTPException(404, f"rollout {rollout_id} does not exist")
        return api.rollout_dict(session, rollout, devices=devices,
                                cache=getattr(ctx.rollouts, "shadow_cache", None),
                                live=getattr(ctx.rollouts, "live_verdicts", None))


def _act(action: str, rollout_id: int, body: RolloutAction | None, request: Request, ctx: ServerContext,
         who: Principal) -> dict:
    with ctx.sessions() as session:
        try:
            rollout = api.act(session, rollout_id, action, actor=who.subject, source=client_address(request),
                              reason=body.reason if body else "")
        except api.RolloutError as exc:
            _raise(exc)
        _nudge(ctx)
        return api.rollout_dict(session, rollout)


@router.post("/rollouts/{rollout_id}/approve", response_model=RolloutInfo, summary="Approve the next wave (operator)",
             responses=_errors(404, 409))
def approve_rollout(rollout_id: DbId, request: Request, body: RolloutAction | None = None,
                    ctx: ServerContext = Depends(get_context),
                    who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    """A rollout awaiting approval starts its next wave."""
    return _act("approve", rollout_id, body, request, ctx, who)


@router.post("/rollouts/{rollout_id}/pause", response_model=RolloutInfo, summary="Pause a rollout (operator)",
             responses=_errors(404, 409))
def pause_rollout(rollout_id: DbId, request: Request, body: RolloutAction | None = None,
                  ctx: ServerContext = Depends(get_context),
                  who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    """No new deploy or promotion goes out; devices already shadowing keep shadowing."""
    return _act("pause", rollout_id, body, request, ctx, who)


@router.post("/rollouts/{rollout_id}/resume", response_model=RolloutInfo, summary="Resume a paused rollout (operator)",
             responses=_errors(404, 409))
def resume_rollout(rollout_id: DbId, request: Request, body: RolloutAction | None = None,
                   ctx: ServerContext = Depends(get_context),
                   who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    """It carries on; a wave that had failed its gates runs again once its devices are back."""
    return _act("resume", rollout_id, body, request, ctx, who)


@router.post("/rollouts/{rollout_id}/abort", response_model=RolloutInfo, summary="Abort a rollout (operator)",
             responses=_errors(404, 409))
def abort_rollout(rollout_id: DbId, request: Request, body: RolloutAction | None = None,
                  ctx: ServerContext = Depends(get_context),
                  who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    """Devices not yet switched abort the candidate; switched devices keep it (see rollback)."""
    return _act("abort", rollout_id, body, request, ctx, who)


@router.post("/rollouts/{rollout_id}/rollback", response_model=RolloutInfo,
             summary="Roll a rollout back (operator)", responses=_errors(404, 409))
def rollback_rollout(rollout_id: DbId, request: Request, body: RolloutAction | None = None,
                     ctx: ServerContext = Depends(get_context),
                     who: Principal = Depends(require(Role.OPERATOR))) -> dict:
    """Every device of the rollout goes back to the version it ran before (signed rollback commands)."""
    return _act("rollback", rollout_id, body, request, ctx, who)
