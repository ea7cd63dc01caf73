"""Completes the OpenAPI document for every router, whoever wrote the route:

- an operation whose summary FastAPI made up from the function name gets its docstring's
  first sentence instead, when it has a docstring;
- an operation that needs a token (its dependencies include a security scheme, see
  server/api/deps.py) declares 401 and 403 answers with the ErrorResponse body, unless it
  already declares them itself.

Routes declare their own other errors (404, 409, ...) with ``responses=``.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI

from protocol.api import API_PREFIX
from server.api.schemas import ErrorResponse

_AUTH_ERRORS = {
    "401": "missing, invalid or revoked token",
    "403": "the token's role does not allow this (or a device token acting for another device)",
}


def _auto_summary(path: str, method: str, operation: dict[str, Any]) -> str | None:
    """The summary FastAPI made up from the function name, if that is what ``operation`` has."""
    suffix = re.sub(r"\W", "_", path) + "_" + method
    operation_id = operation.get("operationId", "")
    if not operation_id.endswith(suffix):
        return None
    name = operation_id[: -len(suffix)]
    return name.replace("_", " ").title()


def document_api(app: FastAPI) -> None:
    """Install the completing ``app.openapi`` (call once, after the routers are included)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.setdefault("ErrorResponse", ErrorResponse.model_json_schema())
        for path, operations in schema.get("paths", {}).items():
            if not path.startswith(API_PREFIX):
                continue
            for method, operation in operations.items():
                if not isinstance(operation, dict):
                    continue
                description = (operation.get("description") or "").strip()
                if description and operation.get("summary") == _auto_summary(path, method, operation):
                    operation["summary"] = description.splitlines()[0].rstrip(".")
                if not operation.get("security"):
                    continue
                responses = operation.setdefault("responses", {})
                for code, text in _AUTH_ERRORS.items():
                    responses.setdefault(code, {
                        "description": text,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    })
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
