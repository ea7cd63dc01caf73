"""Bad input against the served API (issue 10): every integer path/query parameter is bounded to what
the database stores (ids past 2**31-1, offsets past 2**63-1 answer 422, not an overflow 500), and schemathesis fuzzes
every operation of the served OpenAPI document, as admin, with 0 server errors allowed.

The server is the real app behind uvicorn (real Mosquitto, SeaweedFS, SQLite or PostgreSQL), so a
500 from any layer -- validation, the route, the database driver -- is seen as the client sees it.
EDGELOOP_FUZZ_EXAMPLES raises the examples per operation and mode (default 15, derandomized so a CI
failure replays; set EDGELOOP_FUZZ_RANDOM=1 to explore new inputs).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

pytest.register_assert_rewrite("fleet_kit", "dashboard_kit")
from dashboard_kit import LiveServer  # noqa: E402
from fleet_kit import ADMIN, server_settings  # noqa: E402

pytestmark = pytest.mark.integration

PREFIX = "/api/v1"
DB_ID_MAX = 2**31 - 1  # the id columns are INTEGER: 32-bit on PostgreSQL
SQL_INT_MAX = 2**63 - 1  # OFFSET takes a BIGINT; SQLite's INTEGER
EXAMPLES = int(os.environ.get("EDGELOOP_FUZZ_EXAMPLES", "15"))


@pytest.fixture
def live(mqtt_broker, seaweedfs, tmp_path, database_url) -> Iterator[LiveServer]:
    # The broker hook routes take the hook token, not an API token: the same string here, so that
    # the fuzzer reaches their bodies too (unset, they would answer every call 503).
    settings = server_settings(mqtt_broker, seaweedfs, tmp_path, database_url, port=LiveServer.free_port(),
                               broker_hook_token=ADMIN)
    server = LiveServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


def _integer_parameters(spec: dict) -> Iterator[tuple[str, str, dict, list[dict]]]:
    """(method, path, the integer parameter, all the operation's parameters) of every operation."""
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            params = op.get("parameters", [])
            for p in params:
                schema = p.get("schema", {})
                if "integer" in {schema.get("type"), *(s.get("type") for s in schema.get("anyOf", []))}:
                    yield method, path, p, params


def _request(client: httpx.Client, method: str, path: str, params: list[dict], name: str, value: int):
    """``path`` with ``name`` = value; other path parameters a placeholder, other query parameters left out."""
    filled = {p["name"]: (value if p["name"] == name else "fuzz-x") for p in params if p["in"] == "path"}
    url = re.sub(r"\{(\w+)\}", lambda m: str(filled[m.group(1)]), path)
    query = {name: value} if any(p["name"] == name and p["in"] == "query" for p in params) else {}
    return client.request(method.upper(), url, params=query)


def test_every_integer_parameter_is_bounded(live: LiveServer):
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as client:
        spec = client.get("/openapi.json").json()
        found = list(_integer_parameters(spec))
        ids = {(m, path) for m, path, p, _ in found if p["in"] == "path"}
        offsets = {(m, path) for m, path, p, _ in found if p["name"] == "offset"}
        # The routes that overflowed before the bounds: 13 with an integer id, 16 list endpoints.
        assert len(ids) >= 13 and len(offsets) >= 16, (sorted(ids), sorted(offsets))
        problems = []
        for method, path, param, params in found:
            where = f"{method.upper()} {path} {param['name']}"
            schema = param["schema"]
            bounds = schema if "maximum" in schema else next((s for s in schema.get("anyOf", []) if "maximum" in s), {})
            limit = DB_ID_MAX if param["in"] == "path" else SQL_INT_MAX
            maximum = bounds.get("maximum", float("inf"))
            if maximum > limit:
                problems.append(f"{where}: maximum {maximum} is over {limit}")
                maximum = limit
            for value in sorted(v for v in {int(maximum) + 1, 2**31, 2**63, 2**64, 10**30} if v > maximum):
                r = _request(client, method, path, params, param["name"], value)
                if r.status_code != 422:
                    problems.append(f"{where}={value}: {r.status_code} {r.text[:200]}")
            for value in (int(maximum), 0, -1):  # in range or not, never a server error
                r = _request(client, method, path, params, param["name"], value)
                if r.status_code >= 500:
                    problems.append(f"{where}={value}: {r.status_code} {r.text[:200]}")
        # Integer keys in bodies: a model version to deploy or roll out.
        for path in ("/deployments", "/rollouts"):
            for value in (DB_ID_MAX, DB_ID_MAX + 1, 2**63, 2**64, 10**30, 0, -1):
                r = client.post(PREFIX + path, json={"version": value})
                if not 400 <= r.status_code < 500:
                    problems.append(f"POST {path} version={value}: {r.status_code} {r.text[:200]}")
        assert problems == []


def test_bad_values_the_fuzzer_found_answer_4xx(live: LiveServer):
    """Regressions from the schemathesis run: NUL bytes (PostgreSQL text refuses them) and model
    metrics that are not a JSON object of finite numbers."""
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as client:
        for url in (f"{PREFIX}/devices?group=a%00b", f"{PREFIX}/devices/dev%00-1", f"{PREFIX}/audit?actor=%00"):
            r = client.get(url)
            assert r.status_code == 422 and "NUL byte" in r.json()["detail"], (url, r.text)
        for path, body in (("/retrain", {"reason": "nul \u0000 here"}),
                           ("/bootstrap-tokens", {"note": "\u0000"}),
                           ("/deployments", {"devices": ["\u0000"]})):
            r = client.post(PREFIX + path, json=body)  # NUL travels as the JSON escape u0000
            assert r.status_code < 500, (path, r.status_code, r.text)
        files = {"weights": ("model.pt", b"pt"), "onnx": ("model.onnx", b"onnx")}
        for field, value, reason in (("metrics", "1", "must be a JSON object"),
                                     ("metrics", '{"golden": {"map50": "high"}}', "must be a number"),
                                     ("metrics", '{"golden": {"map50": 1e400}}', "out of range"),
                                     ("hyperparameters", '{"lr": NaN}', "NaN is not a JSON number"),
                                     ("hyperparameters", "[]", "must be a JSON object")):
            r = client.post(f"{PREFIX}/models", files=files, data={field: value, "imgsz": "64"})
            assert r.status_code == 422 and reason in r.json()["detail"], (field, value, r.text)
        assert client.get(f"{PREFIX}/models").json()["total"] == 0  # nothing half-registered


def test_schemathesis_finds_no_server_error(live: LiveServer):
    """Positive and negative examples for every operation; any 5xx fails, listing each operation's case."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {ADMIN}"
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 40
    derandomize = os.environ.get("EDGELOOP_FUZZ_RANDOM") != "1"
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=derandomize,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call(base_url=live.url, session=session, timeout=30)
                statuses[response.status_code] += 1
                case.validate_response(response, checks=[not_a_server_error])

            try:
                check()
            except (Exception, BaseExceptionGroup) as exc:  # one operation's failure must not hide the others'
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    print(f"schemathesis: {len(operations)} operations, {statuses.total()} calls, by status {sorted(statuses.items())}")
    assert sum(n for code, n in statuses.items() if code < 300) > len(operations)  # the admin token got through
    assert failures == [], "\n\n".join(failures)
