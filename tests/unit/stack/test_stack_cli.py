"""``edgeloop stack`` commands on saved state (no services started)."""

from __future__ import annotations

import json
import shlex

from typer.testing import CliRunner

from server.stack.cli import app
from server.stack.mosquitto import MosquittoBroker
from server.stack.seaweedfs import SeaweedS3
from server.stack.stack import STATE_NAME, EmbeddedStack, StackState

runner = CliRunner()


def _write_state(directory) -> StackState:
    broker = MosquittoBroker(directory / "mosquitto", port=18840)
    s3 = SeaweedS3(directory / "seaweedfs", s3_port=18841)
    state = StackState(workdir=str(directory), mqtt=broker.state(), s3=s3.state())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_NAME).write_text(state.to_json())
    return state


def test_status_without_a_stack(tmp_path):
    result = runner.invoke(app, ["status", "--dir", str(tmp_path / "none"), "--json"])
    assert result.exit_code == 3
    assert json.loads(result.stdout)["exists"] is False


def test_status_of_a_stopped_stack(tmp_path):
    _write_state(tmp_path)
    result = runner.invoke(app, ["status", "--dir", str(tmp_path), "--json"])
    assert result.exit_code == 3
    info = json.loads(result.stdout)
    assert info["exists"] is True and info["running"] is False
    assert info["services"]["mosquitto"]["endpoint"] == "127.0.0.1:18840"
    assert "password" not in result.stdout and "secret" not in result.stdout


def test_env_prints_exports(tmp_path):
    state = _write_state(tmp_path)
    result = runner.invoke(app, ["env", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    exports = {}
    for line in result.stdout.splitlines():
        assert line.startswith("export ")
        key, _, value = line[len("export ") :].partition("=")
        exports[key] = shlex.split(value)[0]
    assert exports["EDGELOOP_MQTT_PORT"] == "18840"
    assert exports["EDGELOOP_MQTT_PASSWORD"] == state.mqtt["password"]
    assert exports["EDGELOOP_S3_ENDPOINT"] == "127.0.0.1:18841"


def test_env_without_a_stack_fails(tmp_path):
    result = runner.invoke(app, ["env", "--dir", str(tmp_path)])
    assert result.exit_code == 1


def test_down_without_running_services(tmp_path):
    _write_state(tmp_path)
    result = runner.invoke(app, ["down", "--dir", str(tmp_path)])
    assert result.exit_code == 0
    assert "nothing was running" in result.stdout
    assert EmbeddedStack(tmp_path).load_state() is not None  # credentials kept for the next up
