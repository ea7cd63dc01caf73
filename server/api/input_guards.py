"""Bad input answers 4xx with a reason, never 500, whichever route it reaches (issue 10).

- A NUL byte in the URL (path or query) is refused with 422 before any route runs: PostgreSQL
  text cannot hold one, and no id, filter or label of ours contains one.
- A value the database itself refuses (``sqlalchemy.exc.DataError``: a NUL byte in a JSON body's
  string, a number out of a column's range, text longer than its column) is a 422 with the
  database's one-line reason; the request's transaction is rolled back by its session.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.types import ASGIApp, Receive, Scope, Send


class RejectNulInUrl:
    """ASGI middleware: 422 for ``%00`` (or a raw NUL) anywhere in the path or the query string."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = scope.get("query_string", b"")
            where = ("path" if "\x00" in scope.get("path", "")
                     else "query string" if b"\x00" in query or b"%00" in query else None)
            if where is not None:
                response = JSONResponse({"detail": f"the {where} contains a NUL byte (%00)"}, status_code=422)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _database_refused(request: Request, exc: Exception) -> JSONResponse:
    # The driver's message (without the statement and its parameters), first line only.
    lines = str(getattr(exc, "orig", None) or "").strip().splitlines()
    reason = lines[0] if lines else "invalid value"
    return JSONResponse({"detail": f"the database refused a value in the request: {reason}"}, status_code=422)


def install_input_guards(app: FastAPI) -> None:
    app.add_middleware(RejectNulInUrl)
    app.add_exception_handler(DataError, _database_refused)
