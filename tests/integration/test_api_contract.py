"""The API's published contract: the OpenAPI document of the real app is complete (summaries,
declared errors, security schemes, pagination), and errors are 4xx with a reason."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("fleet_kit")
from fleet_kit import bearer, bootstrap_token, enroll, server_settings, start_server  # noqa: E402

pytestmark = pytest.mark.integration

PREFIX = "/api/v1"
METHODS = {"get", "post", "put", "patch", "delete"}
# List endpoints whose page is not (yet) limit/offset: owned elsewhere, listed in the fleet report.
# When one is fixed this test fails until it is removed from here.
KNOWN_UNPAGINATED: set[str] = set()


@pytest.fixture(scope="module")
def app_server(mqtt_broker, seaweedfs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    settings = server_settings(mqtt_broker, seaweedfs, tmp, f"sqlite:///{tmp / 'contract.db'}")
    with start_server(settings) as client:
        yield client


@pytest.fixture(scope="module")
def spec(app_server) -> dict:
    response = app_server.get("/openapi.json", headers={"Authorization": ""})
    assert response.status_code == 200
    return response.json()


def _operations(spec: dict):
    for path, item in spec["paths"].items():
        if path.startswith(PREFIX):
            for method, op in item.items():
                if method in METHODS:
                    yield path, method, op


def test_security_schemes_are_declared(spec):
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["session_cookie"]["in"] == "cookie" and schemes["session_cookie"]["name"] == "edgeloop_token"


def test_every_operation_has_a_summary_and_declares_its_errors(spec):
    ops = list(_operations(spec))
    assert len(ops) >= 25
    problems = []
    for path, method, op in ops:
        where = f"{method.upper()} {path}"
        if not (op.get("summary") or "").strip():
            problems.append(f"{where}: no summary")
        errors = {code for code in op["responses"] if code.startswith("4")}
        if not errors:
            problems.append(f"{where}: declares no 4xx response")
        if op.get("security"):
            missing = {"401", "403"} - errors
            if missing:
                problems.append(f"{where}: needs a token but does not declare {sorted(missing)}")
            for code in ("401", "403"):
                schema = op["responses"].get(code, {}).get("content", {}).get("application/json", {}).get("schema")
                if schema != {"$ref": "#/components/schemas/ErrorResponse"}:
                    problems.append(f"{where}: {code} body is not ErrorResponse")
        elif (path, method) != (f"{PREFIX}/enroll", "post"):
            problems.append(f"{where}: no security requirement (only enrollment is anonymous)")
    assert problems == []
    assert "ErrorResponse" in spec["components"]["schemas"]


def test_enrollment_is_anonymous_and_declares_its_refusals(spec):
    op = spec["paths"][f"{PREFIX}/enroll"]["post"]
    assert not op.get("security")
    assert {"401", "403", "409", "422", "429", "503"} <= set(op["responses"])
    assert op["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/EnrollResponse")


def test_fleet_operations_have_response_models(spec):
    for path, method, op in _operations(spec):
        if "fleet" not in op.get("tags", []):
            continue
        ok = next(code for code in op["responses"] if code.startswith("2"))
        if ok == "204":
            continue
        schema = op["responses"][ok]["content"]["application/json"]["schema"]
        assert "$ref" in schema, f"{method.upper()} {path} has no response model"


def test_list_endpoints_paginate_with_limit_and_offset(spec):
    lists = []
    for path, method, op in _operations(spec):
        if method != "get" or "{" in path or path.endswith("/overview"):  # collections, not one resource
            continue
        lists.append(path)
        names = {p["name"] for p in op.get("parameters", [])}
        if path in KNOWN_UNPAGINATED:
            assert not {"limit", "offset"} <= names, f"{path} paginates now: drop it from KNOWN_UNPAGINATED"
            continue
        assert {"limit", "offset"} <= names, f"GET {path} does not paginate"
    assert f"{PREFIX}/devices" in lists and f"{PREFIX}/bootstrap-tokens" in lists


def test_fleet_pages_say_total_limit_offset(app_server):
    page = app_server.get(f"{PREFIX}/devices", params={"limit": 1, "offset": 0}).json()
    assert set(page) == {"total", "limit", "offset", "items"}
    page = app_server.get(f"{PREFIX}/bootstrap-tokens", params={"limit": 1}).json()
    assert set(page) == {"total", "limit", "offset", "items"}


def test_errors_are_4xx_with_a_reason(app_server):
    cases = [
        (app_server.get(f"{PREFIX}/devices", headers={"Authorization": ""}), 401, "missing bearer token"),
        (app_server.get(f"{PREFIX}/devices", headers=bearer("elt_nope")), 401, "invalid or revoked token"),
        (app_server.get(f"{PREFIX}/devices/ghost"), 404, "unknown device 'ghost'"),
        (app_server.delete(f"{PREFIX}/bootstrap-tokens/999999"), 404, "bootstrap token 999999 does not exist"),
        (app_server.patch(f"{PREFIX}/devices/ghost", json={"tags": ["x"]}), 404, "unknown device 'ghost'"),
    ]
    for response, code, reason in cases:
        assert response.status_code == code, response.text
        assert response.json()["detail"] == reason
    invalid = app_server.post(f"{PREFIX}/bootstrap-tokens", json={"max_uses": 0})
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"][-1] == "max_uses"
    token = bootstrap_token(app_server, max_uses=1)["token"]
    assert enroll(app_server, token, "contract-dev").status_code == 201
    viewer_forbidden = app_server.post(f"{PREFIX}/bootstrap-tokens", json={},
                                       headers=bearer(_token(app_server, "viewer")))
    assert viewer_forbidden.status_code == 403
    assert viewer_forbidden.json()["detail"] == "this action needs the admin role"


def _token(app_server, role: str) -> str:
    from server.auth import Role, issue_token

    with app_server.app.state.ctx.sessions() as session:
        token = issue_token(session, Role(role), f"{role}-contract")
        session.commit()
    return token
