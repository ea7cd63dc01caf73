"""Fleet API: enrollment with bootstrap tokens, device inventory and labels, revocation,
and the presigned upload grant a device asks for its own frames."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from protocol.api import API_PREFIX, EnrollRequest, EnrollResponse, UploadGrant, UploadRequest
from server import audit, bulk_enroll, fleet, metrics
from server.api.deps import client_address, get_context, get_principal, require
from server.api.schemas import (
    BootstrapTokenCreate,
    BootstrapTokenCreated,
    BootstrapTokenInfo,
    DbId,
    DeviceBulkCredentials,
    DeviceCreate,
    DeviceCredentials,
    DeviceInfo,
    DeviceUpdate,
    ErrorResponse,
    Offset,
    Page,
)
from server.auth import Principal, Role
from server.context import ServerContext
from server.db.models import BootstrapToken, Device, utcnow

router = APIRouter(prefix=API_PREFIX)


def _errors(*codes: int, **described: str) -> dict:
    """OpenAPI declaration of the error answers an operation gives (body: ErrorResponse)."""
    text = {400: "bad request", 401: "missing, invalid or revoked token", 403: "not allowed for this caller",
            404: "no such resource", 409: "conflicts with the current state", 413: "too large",
            415: "unsupported content type", 422: "invalid input",
            429: "too many failed attempts from this address", 503: "a backing service is unavailable"}
    text.update({int(k[1:]): v for k, v in described.items()})
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}


def _raise(exc: fleet.FleetError) -> None:
    raise HTTPException(exc.status, exc.reason) from None


# ---------------------------------------------------------------------- enrollment

_limiter_lock = threading.Lock()


def _limiter(request: Request, ctx: ServerContext) -> fleet.FailureLimiter:
    # One per app (per process with memory:// storage), made on first use from the app's settings.
    with _limiter_lock:
        limiter = getattr(request.app.state, "enroll_limiter", None)
        if limiter is None:
            limiter = fleet.FailureLimiter(ctx.settings.enroll_failure_limit, ctx.settings.rate_limit_storage)
            request.app.state.enroll_limiter = limiter
    return limiter


@router.post(
    "/enroll", response_model=EnrollResponse, status_code=201, tags=["fleet"],
    summary="Enroll a device with a bootstrap token",
    responses=_errors(401, 403, 409, 429, 503, _401="unknown bootstrap token",
                      _403="bootstrap token expired, used up or revoked",
                      _409="the device id is enrolled and not revoked"),
)
def enroll_device(body: EnrollRequest, request: Request, response: Response,
                  ctx: ServerContext = Depends(get_context)) -> EnrollResponse:
    """A device presents a bootstrap token once and receives its own identity: a device-role API
    token and broker credentials (written into the broker's password file, broker reloaded).
    The credentials are shown only in this answer. No other authentication: failed attempts are
    limited per client address (429 with Retry-After)."""
    source = client_address(request)
    limiter = _limiter(request, ctx)
    wait = limiter.retry_after(source)
    if wait is not None:
        metrics.ENROLLMENTS.labels(outcome="rate_limited").inc()
        raise HTTPException(429, f"too many failed enrollments from {source}; retry in {wait} s",
                            headers={"Retry-After": str(wait)})
    with ctx.sessions() as session:
        try:
            creds, device, _ = fleet.enroll(
                session, ctx.accounts, secret=body.bootstrap_token, device_id=body.device_id,
                hardware=body.hardware.model_dump() if body.hardware else None,
                agent_version=body.agent_version, source=source)
        except fleet.FleetError as exc:
            session.rollback()
            outcome = {401: "unknown_token", 403: "refused_token", 409: "conflict"}.get(exc.status, "error")
            metrics.ENROLLMENTS.labels(outcome=outcome).inc()
            if exc.status in (401, 403):
                limiter.failed(source)
                # Refusals are kept too: a burst of them from one address is worth seeing.
                audit.record(session, "anonymous", "device.enroll_refused", body.device_id, source,
                             reason=exc.reason)
                session.commit()
            _raise(exc)
        return EnrollResponse(device_id=creds.device_id, api_token=creds.api_token,
                              mqtt_username=creds.mqtt_username, mqtt_password=creds.mqtt_password,
                              groups=device.groups, tags=device.tags)


@router.post("/bootstrap-tokens", response_model=BootstrapTokenCreated, status_code=201, tags=["fleet"],
             summary="Create a bootstrap token (admin)", responses=_errors())
def create_bootstrap_token(body: BootstrapTokenCreate, request: Request, ctx: ServerContext = Depends(get_context),
                           who: Principal = Depends(require(Role.ADMIN))) -> BootstrapTokenCreated:
    """A shared enrollment secret for up to ``max_uses`` devices until it expires; enrolled devices
    join its groups and get its tags. Only its hash is stored: the secret is in this answer only."""
    with ctx.sessions() as session:
        row, secret = fleet.create_bootstrap_token(
            session, created_by=who.subject, expires_in=timedelta(seconds=body.expires_in_seconds),
            max_uses=body.max_uses, groups=body.groups, tags=body.tags, note=body.note)
        audit.record(session, who.subject, "bootstrap_token.create", f"bootstrap:{row.id}", client_address(request),
                     max_uses=row.max_uses, expires_at=row.expires_at.isoformat(), groups=row.groups, tags=row.tags)
        session.commit()
        return BootstrapTokenCreated(**fleet.bootstrap_token_dict(row), token=secret)


@router.get("/bootstrap-tokens", response_model=Page[BootstrapTokenInfo], tags=["fleet"],
            summary="List bootstrap tokens (admin)", responses=_errors())
def list_bootstrap_tokens(
    ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.ADMIN)),
    active: bool | None = Query(None, description="only tokens that can (true) or cannot (false) enroll now"),
    limit: int = Query(100, ge=1, le=1000), offset: Offset = 0,
) -> Page[BootstrapTokenInfo]:
    """Newest first, without secrets; ``state`` says active, expired, exhausted or revoked."""
    now = utcnow()
    with ctx.sessions() as session:
        query = select(BootstrapToken)
        usable = ((BootstrapToken.revoked_at.is_(None)) & (BootstrapToken.expires_at > now)
                  & (BootstrapToken.uses < BootstrapToken.max_uses))
        if active is not None:
            query = query.where(usable if active else ~usable)
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(query.order_by(BootstrapToken.id.desc()).limit(limit).offset(offset)).all()
        return Page[BootstrapTokenInfo](total=total, limit=limit, offset=offset,
                                        items=[fleet.bootstrap_token_dict(r, now) for r in rows])


@router.delete("/bootstrap-tokens/{token_id}", status_code=204, tags=["fleet"],
               summary="Revoke a bootstrap token (admin)", responses=_errors(404))
def revoke_bootstrap_token(token_id: DbId, request: Request, ctx: ServerContext = Depends(get_context),
                           who: Principal = Depends(require(Role.ADMIN))) -> Response:
    """No device can enroll with it afterwards; devices already enrolled with it are unaffected."""
    with ctx.sessions() as session:
        try:
            row = fleet.revoke_bootstrap_token(session, token_id)
        except fleet.FleetError as exc:
            _raise(exc)
        audit.record(session, who.subject, "bootstrap_token.revoke", f"bootstrap:{row.id}", client_address(request),
                     uses=row.uses)
        session.commit()
    return Response(status_code=204)


# ---------------------------------------------------------------------- devices


@router.post("/devices", response_model=DeviceCredentials, status_code=201, tags=["fleet"],
             summary="Provision or re-key a device (admin)", responses=_errors(503))
def provision_device(body: DeviceCreate, request: Request, ctx: ServerContext = Depends(get_context),
                     who: Principal = Depends(require(Role.ADMIN))) -> DeviceCredentials:
    """Create a device, or re-key an existing (or revoked) one: a new API token and broker password,
    shown once; the old ones stop working. Groups/tags given replace the device's."""
    with ctx.sessions() as session:
        try:
            creds, _ = fleet.provision(session, ctx.accounts, device_id=body.device_id, actor=who.subject,
                                       source=client_address(request), groups=body.groups, tags=body.tags)
        except fleet.FleetError as exc:
            _raise(exc)
    return DeviceCredentials(device_id=creds.device_id, api_token=creds.api_token,
                             mqtt_username=creds.mqtt_username, mqtt_password=creds.mqtt_password)


_BULK_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {
        "type": "object", "required": ["devices"], "additionalProperties": False,
        "properties": {"devices": {"type": "array", "minItems": 1, "maxItems": bulk_enroll.BULK_MAX,
                                   "items": {"$ref": "#/components/schemas/DeviceCreate"}}}}},
    "text/csv": {"schema": {"type": "string", "description": (
        "a header row naming id (or device_id) and optionally groups and tags, then one device per "
        "line; labels in a cell separated by ';'")}},
}}}


@router.post("/devices/bulk", response_model=DeviceBulkCredentials, status_code=201, tags=["fleet"],
             summary="Provision or re-key many devices from a JSON list or a CSV (admin)",
             responses=_errors(409, 413, 415, 422, 503, _422="a bad row (named) or too many devices; nothing done"),
             openapi_extra=_BULK_BODY)
async def provision_devices_bulk(request: Request, ctx: ServerContext = Depends(get_context),
                                 who: Principal = Depends(require(Role.ADMIN))) -> DeviceBulkCredentials:
    """Bulk ``POST /devices``: up to 10,000 devices (``bulk_enroll_max``) as JSON
    (``{"devices": [{"device_id", "groups", "tags"}]}``) or CSV (``Content-Type: text/csv``: header
    ``id,groups,tags``, labels in a cell separated by ``;``). All or nothing: a bad row is refused
    with 422 naming it, before anything is written; the devices are then created (or re-keyed) in
    one transaction and their broker accounts written in one batch. Each device's credentials are
    in the answer only, in the order given."""
    max_devices = min(ctx.settings.bulk_enroll_max, bulk_enroll.BULK_MAX)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > bulk_enroll.MAX_BODY_BYTES:
        raise HTTPException(413, f"body of {length} bytes is over the {bulk_enroll.MAX_BODY_BYTES}-byte limit")
    kind = (request.headers.get("content-type") or "application/json").split(";", 1)[0].strip().lower()
    if kind not in ("application/json", "text/csv", "text/plain"):
        raise HTTPException(415, f"send application/json or text/csv, not {kind!r}")
    body = await request.body()
    if len(body) > bulk_enroll.MAX_BODY_BYTES:
        raise HTTPException(413, f"body of {len(body)} bytes is over the {bulk_enroll.MAX_BODY_BYTES}-byte limit")
    try:
        parse = bulk_enroll.parse_json if kind == "application/json" else bulk_enroll.parse_csv
        devices = parse(body, max_devices=max_devices)
    except bulk_enroll.BulkInputError as exc:
        raise HTTPException(422, str(exc)) from None
    source = client_address(request)

    def provision() -> tuple[list[fleet.Credentials], int]:
        with ctx.sessions() as session:
            try:
                return fleet.provision_many(session, ctx.accounts, devices, actor=who.subject, source=source)
            except fleet.FleetError as exc:
                session.rollback()
                _raise(exc)

    creds, rekeyed = await run_in_threadpool(provision)
    return DeviceBulkCredentials(
        total=len(creds), created=len(creds) - rekeyed, rekeyed=rekeyed,
        items=[DeviceCredentials(device_id=c.device_id, api_token=c.api_token, mqtt_username=c.mqtt_username,
                                 mqtt_password=c.mqtt_password) for c in creds])


@router.get("/devices", response_model=Page[DeviceInfo], tags=["fleet"], summary="List devices (inventory)",
            responses=_errors())
def list_devices(
    ctx: ServerContext = Depends(get_context), _: Principal = Depends(require(Role.VIEWER)),
    group: list[str] = Query([], description="in any of these groups (repeatable)"),
    tag: list[str] = Query([], description="carrying all of these tags (repeatable)"),
    online: bool | None = Query(None, description="online (true) or offline/revoked (false)"),
    gpu_compute_capability: str | None = Query(None, description="exact, e.g. 8.7"),
    tensorrt_version: str | None = Query(None, description="exact, e.g. 10.3.0"),
    agent_version: str | None = Query(None),
    revoked: bool | None = Query(None, description="only revoked (true) or only active (false) devices"),
    q: str | None = Query(None, max_length=64, description="device id contains this (any case)"),
    limit: int = Query(100, ge=1, le=1000), offset: Offset = 0,
) -> Page[DeviceInfo]:
    """Devices ordered by id, with hardware, versions, labels, last seen and online state."""
    query = fleet.device_query(groups=group, tags=tag, online=online, gpu_compute_capability=gpu_compute_capability,
                               tensorrt_version=tensorrt_version, agent_version=agent_version, revoked=revoked,
                               id_contains=q)
    with ctx.sessions() as session:
        total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
        rows = session.scalars(query.limit(limit).offset(offset)).all()
        return Page[DeviceInfo](total=total, limit=limit, offset=offset, items=[fleet.device_dict(d) for d in rows])


@router.get("/devices/{device_id}", response_model=DeviceInfo, tags=["fleet"], summary="Get one device",
            responses=_errors(404))
def get_device(device_id: str, ctx: ServerContext = Depends(get_context),
               _: Principal = Depends(require(Role.VIEWER))) -> DeviceInfo:
    with ctx.sessions() as session:
        device = session.get(Device, device_id)
        if device is None:
            raise HTTPException(404, f"unknown device {device_id!r}")
        return DeviceInfo(**fleet.device_dict(device))


@router.patch("/devices/{device_id}", response_model=DeviceInfo, tags=["fleet"],
              summary="Set a device's groups and tags (operator)", responses=_errors(404, 409))
def update_device(device_id: str, body: DeviceUpdate, request: Request, ctx: ServerContext = Depends(get_context),
                  who: Principal = Depends(require(Role.OPERATOR))) -> DeviceInfo:
    """``groups``/``tags`` given replace the device's; a field left out is left as it is."""
    with ctx.sessions() as session:
        try:
            device = fleet.update_labels(session, device_id=device_id, actor=who.subject,
                                         source=client_address(request), groups=body.groups, tags=body.tags)
        except fleet.FleetError as exc:
            _raise(exc)
        return DeviceInfo(**fleet.device_dict(device))


@router.delete("/devices/{device_id}", status_code=204, tags=["fleet"], summary="Revoke a device (admin)",
               responses=_errors(404, 503))
def revoke_device(device_id: str, request: Request, ctx: ServerContext = Depends(get_context),
                  who: Principal = Depends(require(Role.ADMIN))) -> Response:
    """Its broker user is removed (the broker reloads and disconnects it) and its API tokens revoked.
    The record stays, marked revoked; the device can be enrolled again."""
    with ctx.sessions() as session:
        try:
            fleet.revoke(session, ctx.accounts, device_id=device_id, actor=who.subject,
                         source=client_address(request))
        except fleet.FleetError as exc:
            _raise(exc)
    return Response(status_code=204)


@router.post("/devices/{device_id}/uploads", response_model=UploadGrant, tags=["fleet"],
             summary="Presigned upload URL for one collected frame (device)", responses=_errors(413))
def grant_upload(device_id: str, body: UploadRequest, ctx: ServerContext = Depends(get_context),
                 who: Principal = Depends(get_principal)) -> UploadGrant:
    """A presigned PUT under the device's own prefix; only the device itself may ask. Not audited:
    it changes no server state (the sample event that follows is what is recorded)."""
    if not who.is_device(device_id):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only the device itself may request its uploads")
    if body.size_bytes > ctx.settings.max_sample_bytes:
        raise HTTPException(413, f"sample of {body.size_bytes} bytes is over the "
                                 f"{ctx.settings.max_sample_bytes}-byte limit")
    ext = "png" if body.content_type == "image/png" else "jpg"
    key = f"images/{device_id}/{body.sha256[:2]}/{body.sha256}.{ext}"
    expires = timedelta(minutes=15)
    url = ctx.store.presigned_put(key, expires)
    return UploadGrant(object_key=key, url=url, expires_at=datetime.now(UTC) + expires,
                       headers={"Content-Type": body.content_type})
