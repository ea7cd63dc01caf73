"""The operators' dashboard: sign-in with an API token (audited, failures rate-limited), one live page
(tabs over the JSON API, kept current by the server-sent events of ``server.api.events``), and its
static files. Every page carries a strict Content-Security-Policy: scripts and styles only from
``/static``, connections only to this origin.

The live stream and the gallery's image endpoint are included here, so the app includes one router.
"""

from __future__ import annotations

import threading
from pathlib import Path

import structlog
from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from server import audit
from server.api.deps import SESSION_COOKIE, client_address, get_context
from server.api.events import close_streams
from server.api.events import router as events_router
from server.api.sample_image import router as sample_image_router
from server.auth import Principal, Role, authenticate
from server.context import ServerContext

log = structlog.get_logger(__name__)

router = APIRouter()
router.include_router(events_router)
router.include_router(sample_image_router)

_HERE = Path(__file__).parent
_templates = Jinja2Templates(directory=str(_HERE / "templates"))
_static = StaticFiles(directory=str(_HERE / "static"))

SESSION_HOURS = 8
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
_PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
_LOGIN_ERRORS = {
    "invalid": "That token is not valid, or it was revoked.",
    "device": "Device tokens cannot sign in to the dashboard.",
}

_limiter_lock = threading.Lock()


def _page(request: Request, template: str, context: dict, status_code: int = 200) -> HTMLResponse:
    response = _templates.TemplateResponse(request, template, context, status_code=status_code)
    response.headers.update(_PAGE_HEADERS)
    return response


def _login_limiter(request: Request, ctx: ServerContext):
    from server.fleet import FailureLimiter

    # Same policy and storage as failed enrollments, its own counters.
    with _limiter_lock:
        limiter = getattr(request.app.state, "login_limiter", None)
        if limiter is None:
            limiter = FailureLimiter(ctx.settings.enroll_failure_limit, ctx.settings.rate_limit_storage)
            request.app.state.login_limiter = limiter
    return limiter


def _principal(request: Request, ctx: ServerContext) -> tuple[Principal | None, str]:
    token = request.cookies.get(SESSION_COOKIE) or ""
    if not token:
        return None, ""
    admin = ctx.settings.admin_token.get_secret_value() if ctx.settings.admin_token else None
    with ctx.sessions() as session:
        return authenticate(session, token, admin), token


@router.get("/static/{path:path}", include_in_schema=False)
async def static_file(path: str, request: Request) -> Response:
    """The dashboard's scripts, styles and vendored chart library; revalidated by ETag."""
    response = await _static.get_response(path, request.scope)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request) -> HTMLResponse:
    return _page(request, "login.html", {"error": ""})


@router.post("/login", include_in_schema=False)
def login(request: Request, token: str = Form(...), ctx: ServerContext = Depends(get_context)):
    source = client_address(request)
    limiter = _login_limiter(request, ctx)
    wait = limiter.retry_after(source)
    if wait is not None:
        return _page(request, "login.html",
                     {"error": f"Too many failed sign-ins from this address; try again in {wait} s."}, 429)
    token = token.strip()
    admin = ctx.settings.admin_token.get_secret_value() if ctx.settings.admin_token else None
    with ctx.sessions() as session:
        principal = authenticate(session, token, admin) if token else None
        refused = "invalid" if principal is None else "device" if principal.role is Role.DEVICE else ""
        if refused:
            # The attempt is kept (never the token): a burst of them from one address is worth seeing.
            audit.record(session, "anonymous" if principal is None else principal.subject, "dashboard.login_failed",
                         "dashboard", source, reason=_LOGIN_ERRORS[refused])
        else:
            audit.record(session, principal.subject, "dashboard.login", "dashboard", source, role=principal.role.value)
        session.commit()
    if refused:
        limiter.failed(source)
        log.info("dashboard.login_failed", source=source, reason=refused)
        return _page(request, "login.html", {"error": _LOGIN_ERRORS[refused]}, 401)
    log.info("dashboard.login", subject=principal.subject, role=principal.role.value, source=source)
    response = RedirectResponse("/", status_code=303)
    secure = request.url.scheme == "https" or ctx.settings.resolved_public_url().startswith("https://")
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=secure,
                        max_age=SESSION_HOURS * 3600, path="/")
    return response


@router.post("/logout", include_in_schema=False)
async def logout(request: Request) -> RedirectResponse:
    """Forget the cookie and close this token's live streams (the token itself stays valid: it is an
    API token, revoked through the API)."""
    token = request.cookies.get(SESSION_COOKIE) or ""
    closed = await close_streams(request.app, token, "signed out")
    log.info("dashboard.logout", streams_closed=closed)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard(request: Request, ctx: ServerContext = Depends(get_context)):
    principal, _ = _principal(request, ctx)
    if principal is None or principal.role is Role.DEVICE:
        return RedirectResponse("/login", status_code=303)
    return _page(request, "dashboard.html", {"user": principal.subject, "role": principal.role.value,
                                             "public_url": ctx.settings.resolved_public_url()})
