"""The broker asks the server: EMQX 5's HTTP authenticator and authorizer (``broker_accounts=http``).

- ``POST /api/v1/broker/authenticate`` at every connect: the server's own account
  (``mqtt_username``/``mqtt_password``) is allowed as a superuser (EMQX then checks none of its
  publishes or subscriptions); a device is allowed when its account (server/broker_accounts.py
  DatabaseAccounts) has that password and its client id is its user name, as Mosquitto's
  ``use_username_as_clientid`` forces; anything else is denied.
- ``POST /api/v1/broker/authorize`` at a publish or subscribe EMQX has not cached: the device ACL
  model of protocol/ (:func:`protocol.device_may`, the rules :func:`protocol.acl_patterns` writes
  for Mosquitto) for a device whose account still exists, so that a revoked device still
  connected is refused, and with EMQX's ``deny_action = disconnect`` dropped, at its next check.

Both answer 200 with EMQX's ``{"result": "allow" | "deny"}`` (EMQX reads any other status as
"ignore"); they need the hook token (``EDGELOOP_BROKER_HOOK_TOKEN``) as a bearer token: 401
without it or with another one, 503 while the server has none configured. deploy/emqx/ has the
broker side.
"""

from __future__ import annotations

import hmac
from typing import Literal

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from protocol import Channel, device_may, device_topic
from protocol.api import API_PREFIX
from server import metrics
from server.api.deps import get_context
from server.api.schemas import ErrorResponse
from server.broker_accounts import DatabaseAccounts
from server.context import ServerContext

log = structlog.get_logger(__name__)

router = APIRouter(prefix=API_PREFIX + "/broker", tags=["broker"])

hook_scheme = HTTPBearer(
    scheme_name="broker_hook", auto_error=False,
    description="The broker hook token (EDGELOOP_BROKER_HOOK_TOKEN), sent by the broker's HTTP authenticator "
                "and authorizer; no person's or device's API token is accepted here.")

_EXAMPLE_DEVICE = "cam-0001"
_HOOK_ERRORS = {
    401: {"model": ErrorResponse, "description": "missing or wrong hook token"},
    503: {"model": ErrorResponse,
          "description": "no hook token is configured on this server (EDGELOOP_BROKER_HOOK_TOKEN)"},
}


class AuthenticateRequest(BaseModel):
    """What EMQX's HTTP authenticator sends (its ``body`` template, deploy/emqx/emqx.conf)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"username": _EXAMPLE_DEVICE, "password": "the device's broker password",
                      "clientid": _EXAMPLE_DEVICE}]})

    username: str = Field(max_length=64, description="the MQTT user name: a device id, or the server's own")
    password: str = Field(max_length=256)
    clientid: str = Field(max_length=64, description="the MQTT client id; a device's must be its user name")


class AuthenticateResult(BaseModel):
    result: Literal["allow", "deny"]
    is_superuser: bool = Field(
        description="true for the server's own account only: EMQX then checks none of its operations")


class AuthorizeRequest(BaseModel):
    """What EMQX's HTTP authorizer sends (its ``body`` template, deploy/emqx/emqx.conf)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"username": _EXAMPLE_DEVICE, "clientid": _EXAMPLE_DEVICE, "action": "publish",
                      "topic": device_topic(_EXAMPLE_DEVICE, Channel.HEARTBEAT)}]})

    username: str = Field(max_length=64)
    clientid: str = Field(max_length=64)
    topic: str = Field(max_length=1024, description="the topic published to, or the filter subscribed to")
    action: Literal["publish", "subscribe"]


class AuthorizeResult(BaseModel):
    result: Literal["allow", "deny"]


def require_hook_token(request: Request, ctx: ServerContext = Depends(get_context),
                       bearer: HTTPAuthorizationCredentials | None = Depends(hook_scheme)) -> None:
    hook = request.url.path.rsplit("/", 1)[-1]  # authenticate | authorize
    configured = ctx.settings.broker_hook_token.get_secret_value() if ctx.settings.broker_hook_token else ""
    if not configured:
        metrics.BROKER_HOOKS.labels(hook=hook, result="unconfigured").inc()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "the broker hooks are off: set EDGELOOP_BROKER_HOOK_TOKEN (and the same token in "
                            "the broker's HTTP authenticator and authorizer headers)")
    given = bearer.credentials if bearer is not None else ""
    # Constant time: how much of a guessed token matches must not show in the answer's timing.
    if not hmac.compare_digest(given.encode("utf-8"), configured.encode("utf-8")):
        metrics.BROKER_HOOKS.labels(hook=hook, result="unauthorized").inc()
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong broker hook token",
                            headers={"WWW-Authenticate": "Bearer"})


def _accounts(ctx: ServerContext) -> DatabaseAccounts:
    # broker_accounts=http: ctx.accounts. Otherwise no device account is ever written to the
    # table, so every device is denied: the broker would be configured for the wrong backend.
    return ctx.accounts if isinstance(ctx.accounts, DatabaseAccounts) else DatabaseAccounts(ctx.sessions)


def _is_server(ctx: ServerContext, username: str) -> bool:
    return hmac.compare_digest(username.encode("utf-8"), ctx.settings.mqtt_username.encode("utf-8"))


@router.post("/authenticate", response_model=AuthenticateResult, responses=_HOOK_ERRORS,
             dependencies=[Depends(require_hook_token)],
             summary="Authenticate an MQTT connection (EMQX HTTP authenticator)")
def authenticate(body: AuthenticateRequest, ctx: ServerContext = Depends(get_context)) -> AuthenticateResult:
    """Allow the server's own account (as superuser) or a device whose stored account has this
    password and whose client id is its user name; deny anything else."""
    superuser = False
    if _is_server(ctx, body.username):
        expected = ctx.settings.mqtt_password.get_secret_value()
        allowed = bool(expected) and hmac.compare_digest(body.password.encode("utf-8"),
                                                         expected.encode("utf-8"))
        superuser = allowed
        reason = "" if allowed else "wrong server password"
    elif body.clientid != body.username:
        allowed, reason = False, "client id is not the user name"
    else:
        allowed = _accounts(ctx).verify(body.username, body.password)
        reason = "" if allowed else "unknown account or wrong password"
    result = "allow" if allowed else "deny"
    metrics.BROKER_HOOKS.labels(hook="authenticate", result=result).inc()
    if not allowed:
        log.info("broker_hook.authenticate_denied", username=body.username, clientid=body.clientid,
                 reason=reason)
    return AuthenticateResult(result=result, is_superuser=superuser)


@router.post("/authorize", response_model=AuthorizeResult, responses=_HOOK_ERRORS,
             dependencies=[Depends(require_hook_token)],
             summary="Authorize a publish or subscribe (EMQX HTTP authorizer)")
def authorize(body: AuthorizeRequest, ctx: ServerContext = Depends(get_context)) -> AuthorizeResult:
    """Allow a device (client id = user name, account not removed) to publish its own device
    channels and to subscribe to its own commands topic, exactly (no wildcard, no shared
    subscription); deny anything else. The server's account is a superuser, which EMQX does not ask about."""
    allowed = (body.clientid == body.username and device_may(body.username, body.topic, body.action)
               and _accounts(ctx).exists(body.username))
    result = "allow" if allowed else "deny"
    metrics.BROKER_HOOKS.labels(hook="authorize", result=result).inc()
    if not allowed:
        log.info("broker_hook.authorize_denied", username=body.username, clientid=body.clientid,
                 action=body.action, topic=body.topic)
    return AuthorizeResult(result=result)
