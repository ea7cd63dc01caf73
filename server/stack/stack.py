"""Broker + object store together, with their state saved in ``workdir/stack.json``.

``EmbeddedStack(workdir).up(detach=True)`` leaves both services running as daemons (own
sessions) and records ports, pids and credentials in ``stack.json`` (mode 0600) so that
a later ``status()`` / ``down()`` from another process finds them. Used as a context
manager it starts them attached and stops them on exit (tests, demo).

Credentials, ports and data survive ``down``: a later ``up`` in the same folder reuses
them (ports only when still free), so enrolled device users and stored objects persist.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.stack import _proc
from server.stack.errors import ServiceError
from server.stack.mosquitto import MosquittoBroker
from server.stack.ports import DEFAULT_HOST, port_is_open
from server.stack.seaweedfs import SeaweedS3

STATE_NAME = "stack.json"
STATE_VERSION = 1
DEFAULT_BUCKET = "edgeloop"
DEFAULT_DIR = Path(".edgeloop/stack")


@dataclass
class StackState:
    """What ``stack.json`` holds: each service's saved state plus bookkeeping."""

    workdir: str
    mqtt: dict[str, Any]
    s3: dict[str, Any]
    bucket: str = DEFAULT_BUCKET
    detached: bool = False
    started_at: str | None = None
    version: int = STATE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> StackState:
        data = json.loads(text)
        if data.get("version") != STATE_VERSION:
            raise ServiceError(f"unsupported stack state version {data.get('version')!r}")
        return cls(
            workdir=data["workdir"],
            mqtt=data["mqtt"],
            s3=data["s3"],
            bucket=data.get("bucket", DEFAULT_BUCKET),
            detached=bool(data.get("detached", False)),
            started_at=data.get("started_at"),
            extra=data.get("extra", {}),
        )


def stack_settings_env(state: StackState) -> dict[str, str]:
    """Environment variables that point the server (``ServerSettings``) at the stack."""
    mqtt, s3 = state.mqtt, state.s3
    if not mqtt.get("port") or not s3.get("endpoint"):
        raise ServiceError("the stack has not been started: no ports recorded")
    return {
        "EDGELOOP_MQTT_HOST": str(mqtt["host"]),
        "EDGELOOP_MQTT_PORT": str(mqtt["port"]),
        "EDGELOOP_MQTT_USERNAME": str(mqtt["username"]),
        "EDGELOOP_MQTT_PASSWORD": str(mqtt["password"]),
        "EDGELOOP_MQTT_PASSWORD_FILE": str(mqtt["password_file"]),
        "EDGELOOP_MQTT_BROKER_PID_FILE": str(mqtt["pid_file"]),
        "EDGELOOP_MQTT_BROKER_LOG_FILE": str(mqtt["log_file"]),
        "EDGELOOP_S3_ENDPOINT": str(s3["endpoint"]),
        "EDGELOOP_S3_ACCESS_KEY": str(s3["access_key"]),
        "EDGELOOP_S3_SECRET_KEY": str(s3["secret_key"]),
        "EDGELOOP_S3_SECURE": "false",
        "EDGELOOP_S3_REGION": str(s3.get("region") or "us-east-1"),
        "EDGELOOP_S3_BUCKET": state.bucket,
    }


class EmbeddedStack:
    """Mosquitto (``workdir/mosquitto``) and SeaweedFS S3 (``workdir/seaweedfs``)."""

    def __init__(
        self, workdir: Path = DEFAULT_DIR, *, host: str = DEFAULT_HOST, bucket: str = DEFAULT_BUCKET
    ):
        self.workdir = Path(workdir).absolute()
        self.host = host
        self.bucket = bucket
        self.broker: MosquittoBroker | None = None
        self.s3: SeaweedS3 | None = None
        self.state: StackState | None = None

    @property
    def state_file(self) -> Path:
        return self.workdir / STATE_NAME

    # -- state -----------------------------------------------------------------------

    def load_state(self) -> StackState | None:
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return None
        try:
            return StackState.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceError(f"{self.state_file} is not a valid stack state: {exc}") from None

    def _save_state(self) -> StackState:
        assert self.broker is not None and self.s3 is not None
        previous = self.state
        self.state = StackState(
            workdir=str(self.workdir),
            mqtt=self.broker.state(),
            s3=self.s3.state(),
            bucket=self.bucket,
            detached=previous.detached if previous else False,
            started_at=previous.started_at if previous else None,
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        _proc.write_private(self.state_file, self.state.to_json())
        return self.state

    def _handles(self, state: StackState | None) -> tuple[MosquittoBroker, SeaweedS3]:
        if state is None:
            return (
                MosquittoBroker(self.workdir / "mosquitto", host=self.host),
                SeaweedS3(self.workdir / "seaweedfs", host=self.host),
            )
        return MosquittoBroker.attach(state.mqtt), SeaweedS3.attach(state.s3)

    # -- lifecycle -------------------------------------------------------------------

    def up(self, detach: bool = False) -> StackState:
        """Start both services (reusing saved credentials), create the bucket, save the state.

        ``detach=True`` leaves them running after this process exits; otherwise they are
        stopped by :meth:`down` or at interpreter exit at the latest.
        """
        previous = self.load_state()
        broker, s3 = self._handles(previous)
        if broker.running or s3.running:
            running = ", ".join(
                f"{name} pid {svc.pid}"
                for name, svc in (("mosquitto", broker), ("seaweedfs", s3))
                if svc.running
            )
            raise ServiceError(
                f"a stack is already running in {self.workdir} ({running}); "
                f"stop it first with `edgeloop stack down --dir {self.workdir}`"
            )
        if previous is not None:
            self.bucket = previous.bucket
        self._prepare_workdir()
        self.broker, self.s3 = broker, s3
        self.state = previous
        try:
            broker.start(detach=detach)
            self._save_state()
            s3.start(detach=detach)
            self._save_state()
            s3.object_store(self.bucket).ensure_bucket()
        except BaseException:
            self._stop_all()
            raise
        assert self.state is not None
        self.state.detached = detach
        self.state.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        _proc.write_private(self.state_file, self.state.to_json())
        return self.state

    def _prepare_workdir(self) -> None:
        """Create the stack folder. As root, Mosquitto runs as the ``mosquitto`` user and
        must traverse this folder to reach its own: grant search (x) only, never read;
        the secrets inside (stack.json, s3.json, passwd) are 0600."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            mode = stat.S_IMODE(self.workdir.stat().st_mode)
            if not mode & stat.S_IXOTH:
                os.chmod(self.workdir, mode | stat.S_IXOTH)

    def _stop_all(self) -> list[str]:
        stopped: list[str] = []
        errors: list[str] = []
        for name, svc in (("seaweedfs", self.s3), ("mosquitto", self.broker)):
            if svc is None:
                continue
            was_running = svc.running
            try:
                svc.stop()
            except ServiceError as exc:
                errors.append(str(exc))
                continue
            if was_running:
                stopped.append(name)
        if self.broker is not None and self.s3 is not None:
            with contextlib.suppress(OSError):
                self._save_state()
        if errors:
            raise ServiceError("; ".join(errors))
        return stopped

    def down(self) -> list[str]:
        """Stop whatever the saved state says is running (from any process); returns the
        names of the services that were stopped. Credentials and data are kept."""
        if self.broker is None or self.s3 is None:
            state = self.load_state()
            if state is None:
                return []
            self.state = state
            self.broker, self.s3 = self._handles(state)
        return self._stop_all()

    def status(self) -> dict[str, Any]:
        """Whether each service runs and answers, with its endpoint (no secrets)."""
        state = self.state if self.broker is not None else self.load_state()
        if state is None:
            return {"workdir": str(self.workdir), "exists": False, "running": False, "services": {}}
        broker, s3 = (
            (self.broker, self.s3)
            if self.broker is not None and self.s3 is not None
            else self._handles(state)
        )
        mqtt_port = state.mqtt.get("port")
        mqtt = {
            "running": broker.running,
            "pid": state.mqtt.get("pid") if broker.running else None,
            "endpoint": f"{state.mqtt.get('host')}:{mqtt_port}" if mqtt_port else None,
            "answers": bool(mqtt_port) and port_is_open(int(mqtt_port), state.mqtt.get("host", DEFAULT_HOST)),
            "workdir": state.mqtt.get("workdir"),
            "log_file": state.mqtt.get("log_file"),
        }
        s3_state = {
            "running": s3.running,
            "pid": state.s3.get("pid") if s3.running else None,
            "endpoint": state.s3.get("endpoint"),
            "answers": "s3" in s3.ports and s3.s3_answers(),
            "workdir": state.s3.get("workdir"),
            "log_dir": str(Path(state.s3["workdir"]) / "logs") if state.s3.get("workdir") else None,
            "bucket": state.bucket,
        }
        return {
            "workdir": str(self.workdir),
            "exists": True,
            "running": mqtt["running"] and s3_state["running"],
            "detached": state.detached,
            "started_at": state.started_at,
            "services": {"mosquitto": mqtt, "seaweedfs": s3_state},
        }

    def settings_env(self) -> dict[str, str]:
        state = self.state or self.load_state()
        if state is None:
            raise ServiceError(f"no stack in {self.workdir}: run `edgeloop stack up --dir {self.workdir}`")
        return stack_settings_env(state)

    def object_store(self):
        """An ObjectStore on the stack's bucket with the server's keys."""
        if self.s3 is None:
            state = self.load_state()
            if state is None:
                raise ServiceError(f"no stack in {self.workdir}")
            self.s3 = SeaweedS3.attach(state.s3)
        return self.s3.object_store(self.bucket)

    def __enter__(self) -> EmbeddedStack:
        self.up(detach=False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
