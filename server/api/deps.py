"""FastAPI dependencies: the server context, the caller's identity, role checks.

The token is read through FastAPI's security classes (bearer header, or the dashboard's session
cookie) so that the OpenAPI document declares both schemes and marks every protected operation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from server.auth import Principal, Role, authenticate
from server.context import ServerContext

SESSION_COOKIE = "edgeloop_token"

bearer_scheme = HTTPBearer(
    scheme_name="bearer", auto_error=False,
    description="An API token (`elt_...`): a person's (viewer, operator, engineer, admin) or a device's.")
cookie_scheme = APIKeyCookie(
    name=SESSION_COOKIE, scheme_name="session_cookie", auto_error=False,
    description="The dashboard's session cookie, holding the same API token after /login.")


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx


def get_principal(
    ctx: ServerContext = Depends(get_context),
    bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    cookie: str | None = Depends(cookie_scheme),
) -> Principal:
    token = bearer.credentials.strip() if bearer is not None else cookie
    if not token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    admin = ctx.settings.admin_token.get_secret_value() if ctx.settings.admin_token else None
    with ctx.sessions() as session:
        principal = authenticate(session, token, admin)
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


def require(role: Role) -> Callable[[Principal], Principal]:
    def check(principal: Principal = Depends(get_principal)) -> Principal:
        if not principal.at_least(role):
            hint = "; a device token acts only as its own device" if principal.role is Role.DEVICE else ""
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this action needs the {role.value} role{hint}")
        return principal

    return check


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ValueError(f"{text} is out of range for a number")
    return value


def json_form_field(field: str, text: str) -> Any:
    """A form field holding JSON, else 422; NaN and Infinity are refused (no database's JSON stores them)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except ValueError as exc:  # json.JSONDecodeError included
        raise HTTPException(422, f"{field} is not JSON: {exc}") from None
