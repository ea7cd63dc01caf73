"""deploy/emqx/: the EMQX cluster's configuration agrees with the server it asks. No EMQX runs here
(deploy/emqx/README.md says how to run it): these check what can be checked without one -- the
hook URLs and request bodies against the routes' own models, the compose services against the
cluster seeds and the server's settings, and start.sh's rendering of the template."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from server.api.broker_hooks import AuthenticateRequest, AuthorizeRequest
from server.api.broker_hooks import router as hooks_router
from server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[3]
EMQX = REPO / "deploy" / "emqx"
TOKEN = "t0k3n-" + "a" * 40
ENV = {
    "EDGELOOP_PUBLIC_HOST": "192.0.2.10", "POSTGRES_PASSWORD": "pg-pass", "S3_ACCESS_KEY": "edgeloop",
    "S3_SECRET_KEY": "s3-secret-key", "EDGELOOP_ADMIN_TOKEN": "admin-token", "EDGELOOP_MQTT_PASSWORD": "mqtt-pass",
    "EDGELOOP_BROKER_HOOK_TOKEN": TOKEN, "EMQX_NODE_COOKIE": "cookie", "EMQX_DASHBOARD_PASSWORD": "dash",
}


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}; $$ is a literal $."""
    def sub(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} is required")
    return re.sub(r"(?<!\$)\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", sub, text)


def _compose(env: dict[str, str] = ENV) -> dict:
    return yaml.safe_load(_interpolate((EMQX / "compose.emqx.yaml").read_text(), env))


def _conf() -> str:
    return (EMQX / "emqx.conf").read_text()


def _blocks(conf: str, key: str) -> list[str]:
    """The text of every ``key { ... }`` block (braces balanced)."""
    found = []
    for match in re.finditer(rf"\b{key}\s*\{{", conf):
        depth, i = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(conf[i], 0)
            i += 1
        found.append(conf[match.end():i - 1])
    return found


def test_hook_urls_are_the_servers_routes_and_host():
    paths = {route.path for route in hooks_router.routes}
    urls = re.findall(r'url = "([^"]+)"', _conf())
    assert len(urls) == 2
    aliases = _compose()["services"]["server"]["networks"]["edgeloop"]["aliases"]
    for url in urls:
        match = re.fullmatch(r"http://([a-z-]+):(\d+)(/\S+)", url)
        assert match, url
        host, port, path = match.groups()
        assert host in aliases and path in paths
        assert port == _compose()["services"]["server"]["environment"]["EDGELOOP_PORT"]
    assert urls[0].endswith("/authenticate") and urls[1].endswith("/authorize")


def test_request_bodies_are_exactly_the_routes_models():
    # The models forbid unknown fields: a body template with one more (or one less) field would be
    # a 422 on every connect, which EMQX reads as "ignore".
    bodies = _blocks(_conf(), "body")
    assert len(bodies) == 2
    for body, model in zip(bodies, (AuthenticateRequest, AuthorizeRequest), strict=True):
        fields = dict(re.findall(r'(\w+)\s*=\s*"\$\{(\w+)\}"', body))
        assert set(fields) == set(model.model_fields), (fields, model)
        assert all(key == placeholder for key, placeholder in fields.items())  # EMQX's own names


def test_both_hooks_send_the_token_and_authorization_denies_by_default():
    conf = _conf()
    headers = _blocks(conf, "headers")
    assert len(headers) == 2
    for block in headers:
        assert '"Authorization" = "Bearer @EDGELOOP_BROKER_HOOK_TOKEN@"' in block
    (authz,) = [b for b in _blocks(conf, "authorization")]
    assert re.search(r"\bno_match = deny\b", authz) and re.search(r"\bdeny_action = disconnect\b", authz)
    (cache,) = _blocks(authz, "cache")
    assert "enable = true" in cache and "max_size = 32" in cache and "ttl = 1m" in cache
    # Only the http source: EMQX's default ACL file source ends with allow-all.
    assert re.findall(r"\btype = (\w+)", authz) == ["http"]
    # The server's account first (built-in database, bootstrapped), then the hook for devices.
    assert re.findall(r"\bbackend = (\w+)", conf) == ["built_in_database", "http"]


def test_compose_runs_three_nodes_seeded_by_name_and_the_server_on_http_accounts():
    services = _compose()["services"]
    nodes = {name: s for name, s in services.items() if name.startswith("emqx")}
    assert sorted(nodes) == ["emqx1", "emqx2", "emqx3"]
    seeds = re.search(r"seeds = \[([^\]]*)\]", _conf()).group(1)
    assert sorted(re.findall(r'"([^"]+)"', seeds)) == sorted(s["environment"]["EMQX_NODE__NAME"] for s in nodes.values())
    for name, node in nodes.items():
        env = node["environment"]
        host = env["EMQX_NODE__NAME"].split("@", 1)[1]
        assert host in node["networks"]["edgeloop"]["aliases"], name
        assert env["EDGELOOP_BROKER_HOOK_TOKEN"] == TOKEN and env["EMQX_NODE__COOKIE"] == "cookie"
        assert node["entrypoint"] == ["/bin/sh", "/edgeloop/start.sh"] and node["healthcheck"]["test"]
        for volume in node["volumes"]:
            source = volume.split(":", 1)[0]
            assert (EMQX / source).exists() if source.startswith(".") else source in _compose()["volumes"]
    server_env = {k: str(v) for k, v in services["server"]["environment"].items()}
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("EDGELOOP_")]:
            mp.delenv(key)
        for key, value in server_env.items():
            mp.setenv(key, value)
        settings = ServerSettings()
    assert settings.broker_accounts == "http"
    assert settings.broker_hook_token.get_secret_value() == TOKEN
    assert settings.mqtt_password_file is None  # nothing to write: the brokers ask
    assert settings.mqtt_host in nodes["emqx1"]["networks"]["edgeloop"]["aliases"]
    assert settings.mqtt_username == nodes["emqx1"]["environment"]["EDGELOOP_MQTT_USERNAME"]
    assert settings.mqtt_password.get_secret_value() == nodes["emqx1"]["environment"]["EDGELOOP_MQTT_PASSWORD"]
    assert set(services["server"]["depends_on"]) >= {"emqx1", "postgres", "minio"}


def test_compose_needs_the_hook_token():
    env = {k: v for k, v in ENV.items() if k != "EDGELOOP_BROKER_HOOK_TOKEN"}
    with pytest.raises(AssertionError, match="EDGELOOP_BROKER_HOOK_TOKEN"):
        _compose(env)


def _render(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "EDGELOOP_EMQX_RENDER_ONLY": "1",
               "EDGELOOP_EMQX_TEMPLATE": str(EMQX / "emqx.conf"), "EDGELOOP_EMQX_ETC": str(tmp_path), **env}
    return subprocess.run(["sh", str(EMQX / "start.sh")], env=run_env, capture_output=True, text=True, timeout=30)


def test_start_sh_fills_in_the_token_and_the_server_account(tmp_path):
    done = _render(tmp_path, EDGELOOP_BROKER_HOOK_TOKEN=TOKEN, EDGELOOP_MQTT_PASSWORD="mqtt-pass")
    assert done.returncode == 0, done.stderr
    conf = (tmp_path / "emqx.conf").read_text()
    assert "@EDGELOOP_BROKER_HOOK_TOKEN@" not in conf
    assert conf.count(f'"Authorization" = "Bearer {TOKEN}"') == 2
    assert conf == _conf().replace("@EDGELOOP_BROKER_HOOK_TOKEN@", TOKEN)  # nothing else touched
    csv = (tmp_path / "edgeloop-server-account.csv").read_text()
    assert csv == "user_id,password,is_superuser\n_edgeloop-server,mqtt-pass,true\n"
    assert re.search(r'bootstrap_file = "/opt/emqx/etc/edgeloop-server-account.csv"', conf)
    assert oct((tmp_path / "edgeloop-server-account.csv").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(("env", "message"), [
    ({"EDGELOOP_MQTT_PASSWORD": "p"}, "EDGELOOP_BROKER_HOOK_TOKEN is not set"),
    ({"EDGELOOP_BROKER_HOOK_TOKEN": "short-token", "EDGELOOP_MQTT_PASSWORD": "p"}, "shorter than 32"),
    ({"EDGELOOP_BROKER_HOOK_TOKEN": TOKEN + "/x", "EDGELOOP_MQTT_PASSWORD": "p"}, "may hold only"),
    ({"EDGELOOP_BROKER_HOOK_TOKEN": TOKEN + '"', "EDGELOOP_MQTT_PASSWORD": "p"}, "may hold only"),
    ({"EDGELOOP_BROKER_HOOK_TOKEN": TOKEN, "EDGELOOP_MQTT_PASSWORD": "a,b"}, "EDGELOOP_MQTT_PASSWORD may hold only"),
    ({"EDGELOOP_BROKER_HOOK_TOKEN": TOKEN}, "EDGELOOP_MQTT_PASSWORD is not set"),
])
def test_start_sh_refuses_values_it_cannot_write_safely(tmp_path, env, message):
    done = _render(tmp_path, **env)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "emqx.conf").exists()
