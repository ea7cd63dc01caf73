"""FastAPI dependencies: the server context, the caller's identity, role checks."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, HTTPException, Request, status

from server.auth import Principal, Role, authenticate
from server.context import ServerContext

SESSION_COOKIE = "edgeloop_token"


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx


def _token_from(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(SESSION_COOKIE)


def get_principal(request: Request, ctx: ServerContext = Depends(get_context)) -> Principal:
    token = _token_from(request)
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
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this action needs the {role.value} role")
        return principal

    return check


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""
