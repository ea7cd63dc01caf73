"""EmbeddedStack: detached daemons found again from stack.json, stopped from another handle."""

from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from server.stack.errors import ServiceError
from server.stack.ports import port_is_open
from server.stack.stack import EmbeddedStack, stack_settings_env

pytestmark = pytest.mark.integration


@pytest.fixture
def stack_dir():
    # Mosquitto drops to the `mosquitto` user when started as root: the folder must be
    # reachable by it, which pytest's 0700 tmp root is not.
    path = Path(tempfile.mkdtemp(prefix="edgeloop-stack-"))
    yield path
    EmbeddedStack(path).down()  # never leave daemons behind, even when the test fails
    shutil.rmtree(path, ignore_errors=True)


def test_detached_up_status_down_and_restart(stack_dir):
    state = EmbeddedStack(stack_dir).up(detach=True)
    state_file = stack_dir / "stack.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600

    # A fresh handle (as `edgeloop stack status` in another process) finds the daemons.
    status = EmbeddedStack(stack_dir).status()
    assert status["running"] and status["detached"]
    assert status["services"]["mosquitto"]["answers"]
    assert status["services"]["seaweedfs"]["answers"]

    env = stack_settings_env(state)
    store = EmbeddedStack(stack_dir).object_store()
    store.put_bytes("persist/check.txt", b"kept")

    with pytest.raises(ServiceError, match="already running"):
        EmbeddedStack(stack_dir).up(detach=True)

    stopped = EmbeddedStack(stack_dir).down()
    assert sorted(stopped) == ["mosquitto", "seaweedfs"]
    assert not port_is_open(int(env["EDGELOOP_MQTT_PORT"]))
    assert not EmbeddedStack(stack_dir).status()["running"]

    # Up again in the same folder: same credentials, data kept.
    with EmbeddedStack(stack_dir) as again:
        env2 = again.settings_env()
        for key in ("EDGELOOP_MQTT_PASSWORD", "EDGELOOP_S3_ACCESS_KEY", "EDGELOOP_S3_SECRET_KEY"):
            assert env2[key] == env[key]
        assert again.object_store().get_bytes("persist/check.txt", 100) == b"kept"
    assert not EmbeddedStack(stack_dir).status()["running"]
