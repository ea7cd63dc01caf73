"""The broker hook routes (server/api/broker_hooks.py: EMQX 5's HTTP authenticator and authorizer)
on a FastAPI app holding only them, over accounts in a SQLite file (DatabaseAccounts). The same
routes inside the whole server, with enrollment writing the accounts, are in
tests/integration/test_broker_hooks.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydantic import SecretStr

from protocol import Channel, device_topic
from server.api.broker_hooks import router
from server.broker_accounts import DatabaseAccounts
from server.db.session import make_engine, make_session_factory, upgrade_schema
from server.settings import ServerSettings

HOOK_TOKEN = "hook-token-" + "x" * 40
SERVER_USER, SERVER_PASSWORD = "_edgeloop-server", "server-secret"
AUTHN, AUTHZ = "/api/v1/broker/authenticate", "/api/v1/broker/authorize"


def _app(tmp_path, *, token: str | None = HOOK_TOKEN) -> tuple[TestClient, DatabaseAccounts]:
    engine = make_engine(f"sqlite:///{tmp_path / 'edgeloop.db'}")
    upgrade_schema(engine)
    sessions = make_session_factory(engine)
    accounts = DatabaseAccounts(sessions)
    settings = ServerSettings(broker_accounts="http", mqtt_username=SERVER_USER,
                              mqtt_password=SecretStr(SERVER_PASSWORD),
                              broker_hook_token=SecretStr(token) if token is not None else None)
    app = FastAPI()
    app.include_router(router)
    app.state.ctx = SimpleNamespace(settings=settings, sessions=sessions, accounts=accounts)
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {HOOK_TOKEN}"
    return client, accounts


@pytest.fixture
def hooks(tmp_path):
    client, accounts = _app(tmp_path)
    accounts.add_user("cam-1", "cam-1-password")
    accounts.add_user("cam-2", "cam-2-password")
    return client, accounts


def _authn(client, username, password, clientid=None, **kw):
    body = {"username": username, "password": password, "clientid": username if clientid is None else clientid}
    return client.post(AUTHN, json=body, **kw)


def _authz(client, username, topic, action, clientid=None, **kw):
    body = {"username": username, "clientid": username if clientid is None else clientid, "topic": topic,
            "action": action}
    return client.post(AUTHZ, json=body, **kw)


def _count(hook: str, result: str) -> float:
    return REGISTRY.get_sample_value("edgeloop_broker_hook_total", {"hook": hook, "result": result}) or 0.0


# ---------------------------------------------------------------------- authenticate


def test_the_servers_own_account_is_a_superuser(hooks):
    client, _ = hooks
    r = _authn(client, SERVER_USER, SERVER_PASSWORD, clientid="edgeloop-replica-2")  # replicas: own client ids
    assert r.status_code == 200 and r.json() == {"result": "allow", "is_superuser": True}
    assert _authn(client, SERVER_USER, "wrong").json() == {"result": "deny", "is_superuser": False}


def test_a_device_with_its_password_and_its_name_as_client_id(hooks):
    client, _ = hooks
    before = _count("authenticate", "allow")
    r = _authn(client, "cam-1", "cam-1-password")
    assert r.status_code == 200 and r.json() == {"result": "allow", "is_superuser": False}
    assert _count("authenticate", "allow") == before + 1


@pytest.mark.parametrize(("username", "password", "clientid"), [
    ("cam-1", "cam-2-password", "cam-1"),   # another device's password
    ("cam-1", "", "cam-1"),
    ("cam-1", "cam-1-password", "cam-2"),   # the right password, another client id
    ("cam-1", "cam-1-password", "cam-1-b"),
    ("cam-1", "cam-1-password", ""),
    ("cam-3", "cam-1-password", "cam-3"),   # no such account
    ("", "", ""),
    ("Cam-1", "cam-1-password", "Cam-1"),   # not a device id
])
def test_anything_else_is_denied(hooks, username, password, clientid):
    client, _ = hooks
    before = _count("authenticate", "deny")
    r = _authn(client, username, password, clientid)
    assert r.status_code == 200 and r.json() == {"result": "deny", "is_superuser": False}
    assert _count("authenticate", "deny") == before + 1


def test_a_removed_account_is_denied_at_once(hooks):
    client, accounts = hooks
    assert _authn(client, "cam-1", "cam-1-password").json()["result"] == "allow"
    assert _authz(client, "cam-1", device_topic("cam-1", Channel.STATUS), "publish").json()["result"] == "allow"
    accounts.remove_user("cam-1")  # what revoking the device does
    assert _authn(client, "cam-1", "cam-1-password").json()["result"] == "deny"
    # Still connected? Its next publish is refused too (EMQX: deny_action = disconnect drops it).
    assert _authz(client, "cam-1", device_topic("cam-1", Channel.STATUS), "publish").json()["result"] == "deny"


def test_a_device_cannot_take_the_servers_name(hooks):
    client, accounts = hooks
    with pytest.raises(ValueError):
        accounts.add_user(SERVER_USER, "guess")
    assert _authn(client, SERVER_USER, "guess").json()["result"] == "deny"


# ---------------------------------------------------------------------- authorize


@pytest.mark.parametrize("channel", list(Channel))
def test_own_topics_as_the_acl_patterns_say(hooks, channel):
    client, _ = hooks
    own = device_topic("cam-1", channel)
    publish = _authz(client, "cam-1", own, "publish").json()["result"]
    subscribe = _authz(client, "cam-1", own, "subscribe").json()["result"]
    if channel is Channel.COMMANDS:
        assert (publish, subscribe) == ("deny", "allow")  # only the server sends commands
    else:
        assert (publish, subscribe) == ("allow", "deny")
    # Another device's topic, either way: never.
    other = device_topic("cam-2", channel)
    assert _authz(client, "cam-1", other, "publish").json()["result"] == "deny"
    assert _authz(client, "cam-1", other, "subscribe").json()["result"] == "deny"


@pytest.mark.parametrize("topic_filter", [
    "edgeloop/v1/devices/cam-1/#", "edgeloop/v1/devices/cam-1/+", "edgeloop/v1/devices/+/commands", "#",
    "$share/g/edgeloop/v1/devices/cam-1/commands", "$SYS/#",
])
def test_wildcard_and_shared_subscriptions_are_denied(hooks, topic_filter):
    client, _ = hooks
    assert _authz(client, "cam-1", topic_filter, "subscribe").json() == {"result": "deny"}


def test_authorize_needs_the_client_id_to_be_the_user_name(hooks):
    client, _ = hooks
    status = device_topic("cam-1", Channel.STATUS)
    assert _authz(client, "cam-1", status, "publish").json()["result"] == "allow"
    assert _authz(client, "cam-1", status, "publish", clientid="cam-2").json()["result"] == "deny"


def test_authorize_counts_its_results(hooks):
    client, _ = hooks
    allow, deny = _count("authorize", "allow"), _count("authorize", "deny")
    _authz(client, "cam-1", device_topic("cam-1", Channel.HEARTBEAT), "publish")
    _authz(client, "cam-1", device_topic("cam-2", Channel.HEARTBEAT), "publish")
    assert (_count("authorize", "allow"), _count("authorize", "deny")) == (allow + 1, deny + 1)


# ---------------------------------------------------------------------- the hook token, bad bodies


@pytest.mark.parametrize("path", [AUTHN, AUTHZ])
@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer wrong", f"Bearer {HOOK_TOKEN}x",
                                    f"Bearer {HOOK_TOKEN[:-1]}", f"Basic {HOOK_TOKEN}", HOOK_TOKEN])
def test_without_the_hook_token_401(hooks, path, header):
    client, _ = hooks
    body = ({"username": "cam-1", "password": "cam-1-password", "clientid": "cam-1"} if path == AUTHN else
            {"username": "cam-1", "clientid": "cam-1", "topic": device_topic("cam-1", Channel.STATUS),
             "action": "publish"})
    headers = {"Authorization": header} if header is not None else {}
    if header is None:
        client.headers.pop("Authorization")
    hook = path.rsplit("/", 1)[-1]
    before = _count(hook, "unauthorized")
    r = client.post(path, json=body, headers=headers)
    assert r.status_code == 401, r.text
    assert _count(hook, "unauthorized") == before + 1
    # Even a bad body: the token is checked first.
    assert client.post(path, json={"nonsense": 1}, headers=headers).status_code == 401


@pytest.mark.parametrize("path", [AUTHN, AUTHZ])
def test_no_token_configured_503(tmp_path, path):
    client, _ = _app(tmp_path, token=None)
    r = client.post(path, json={"username": "cam-1"})
    assert r.status_code == 503 and "EDGELOOP_BROKER_HOOK_TOKEN" in r.json()["detail"]


@pytest.mark.parametrize(("path", "body"), [
    (AUTHN, {"username": "cam-1", "password": "p"}),                                   # clientid missing
    (AUTHN, {"username": "cam-1", "password": "p", "clientid": "cam-1", "peerhost": "x"}),  # unknown field
    (AUTHN, {"username": "c" * 65, "password": "p", "clientid": "cam-1"}),
    (AUTHN, {"username": "cam-1", "password": "p" * 257, "clientid": "cam-1"}),
    (AUTHN, {"username": "cam-1", "password": "p", "clientid": "c" * 65}),
    (AUTHN, {"username": "cam-1", "password": 12345, "clientid": "cam-1"}),             # not a string
    (AUTHN, {"username": None, "password": "p", "clientid": "cam-1"}),
    (AUTHZ, {"username": "cam-1", "clientid": "cam-1", "topic": "t" * 1025, "action": "publish"}),
    (AUTHZ, {"username": "cam-1", "clientid": "cam-1", "topic": "t", "action": "all"}),
    (AUTHZ, {"username": "cam-1", "clientid": "cam-1", "topic": "t"}),
    (AUTHZ, {"username": "cam-1", "clientid": "cam-1", "topic": "t", "action": "publish", "qos": 1}),
])
def test_bad_bodies_422(hooks, path, body):
    client, _ = hooks
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text


def test_the_limits_are_inclusive(hooks):
    client, accounts = hooks
    name = "a" * 63  # the longest device id (the field allows 64: a longer name is a deny, not a 422)
    accounts.add_user(name, "p" * 256)
    assert _authn(client, name, "p" * 256).json()["result"] == "allow"
    assert _authn(client, "a" * 64, "p").json()["result"] == "deny"
    topic = device_topic(name, Channel.STATUS) + "/" + "x" * (1024 - len(device_topic(name, Channel.STATUS)) - 1)
    assert len(topic) == 1024 and _authz(client, name, topic, "publish").json()["result"] == "deny"


def test_both_routes_are_in_the_openapi_document_with_their_security(hooks):
    client, _ = hooks
    spec = client.get("/openapi.json").json()
    for path, request, result in ((AUTHN, "AuthenticateRequest", "AuthenticateResult"),
                                  (AUTHZ, "AuthorizeRequest", "AuthorizeResult")):
        op = spec["paths"][path]["post"]
        assert op["security"] == [{"broker_hook": []}]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(request)
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(result)
        assert {"401", "422", "503"} <= set(op["responses"])
        schema = spec["components"]["schemas"][request]
        assert schema["additionalProperties"] is False
    assert spec["components"]["schemas"]["AuthorizeRequest"]["properties"]["topic"]["maxLength"] == 1024
    assert spec["components"]["schemas"]["AuthenticateRequest"]["properties"]["password"]["maxLength"] == 256
    assert spec["components"]["securitySchemes"]["broker_hook"]["scheme"] == "bearer"
