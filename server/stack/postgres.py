"""A throwaway PostgreSQL cluster on a free port, for tests and one-machine setups.

Uses Debian's ``postgresql`` binaries (``initdb``, ``pg_ctl``). PostgreSQL refuses to run
as root, so when we are root the cluster runs as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from server.stack.errors import ServiceError
from server.stack.ports import find_free_port, wait_for_port

INSTALL_HINT = "install it with `apt-get install -y postgresql` (Debian/Ubuntu)"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    if not found:
        raise ServiceError(f"PostgreSQL's `{name}` not found: {INSTALL_HINT}")
    return found[-1]  # the newest major version


class PostgresServer:
    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1", database: str = "edgeloop"):
        self.workdir = Path(workdir)
        self.host = host
        self.port = port or find_free_port(host)
        self.database = database
        self.user = "edgeloop"
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceError(f"running as root but there is no 'postgres' user: {INSTALL_HINT}") from None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{self.database}"

    def _run(self, args: list[str]) -> None:
        kwargs = {}
        if self._run_as is not None:
            uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
            kwargs = {"user": uid, "group": gid, "extra_groups": []}
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd="/", **kwargs)
        if proc.returncode != 0:
            raise ServiceError(f"{Path(args[0]).name} failed: {(proc.stderr or proc.stdout).strip()[-1000:]}")

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            os.chown(self.workdir, self._run_as.pw_uid, self._run_as.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            # trust auth on a loopback-only, throwaway cluster
            self._run([_bin("initdb"), "-D", str(self.data_dir), "-U", self.user, "-A", "trust", "-E", "UTF8"])
        self._run([_bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.workdir / "postgres.log"), "-w",
                   "-o", f"-p {self.port} -h {self.host} -k {self.workdir}", "start"])
        wait_for_port(self.port, self.host, timeout=30)
        self._run([_bin("createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, self.database])

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run([_bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"])
