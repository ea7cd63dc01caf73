"""The operators' dashboard: a login with an API token, then a live overview page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from server.api.deps import SESSION_COOKIE, get_context
from server.auth import authenticate
from server.context import ServerContext

router = APIRouter(include_in_schema=False)
_templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, error: str = "") -> HTMLResponse:
    return _templates.TemplateResponse(request, "login.html", {"error": error})


@router.post("/login")
def login(token: str = Form(...), ctx: ServerContext = Depends(get_context)):
    admin = ctx.settings.admin_token.get_secret_value() if ctx.settings.admin_token else None
    with ctx.sessions() as session:
        principal = authenticate(session, token.strip(), admin)
    if principal is None or principal.role.value == "device":
        return RedirectResponse("/login?error=invalid+token", status_code=303)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(SESSION_COOKIE, token.strip(), httponly=True, samesite="strict", max_age=8 * 3600)
    return response


@router.get("/logout")
def logout():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, ctx: ServerContext = Depends(get_context)):
    token = request.cookies.get(SESSION_COOKIE)
    admin = ctx.settings.admin_token.get_secret_value() if ctx.settings.admin_token else None
    principal = None
    if token:
        with ctx.sessions() as session:
            principal = authenticate(session, token, admin)
    if principal is None:
        return RedirectResponse("/login", status_code=303)
    return _templates.TemplateResponse(request, "dashboard.html", {"user": principal.subject,
                                                                    "role": principal.role.value})
