"""Per-device broker credentials: lines in Mosquitto's password file, then a SIGHUP to reload.

The ACL needs no per-device lines: its ``%u`` patterns scope every device to its own topics.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path


class BrokerAccountError(RuntimeError):
    pass


class BrokerAccounts:
    def __init__(self, password_file: Path, pid_file: Path | None = None) -> None:
        self._password_file = Path(password_file)
        self._pid_file = Path(pid_file) if pid_file else None

    def _passwd(self, *args: str) -> None:
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            raise BrokerAccountError("mosquitto_passwd not found: install it with `apt-get install -y mosquitto`")
        proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise BrokerAccountError(f"mosquitto_passwd failed: {proc.stderr.strip() or proc.stdout.strip()}")

    def set_password(self, username: str, password: str) -> None:
        create = [] if self._password_file.exists() else ["-c"]
        stat = self._password_file.stat() if self._password_file.exists() else None
        self._passwd(*create, "-b", str(self._password_file), username, password)
        if stat is not None:  # keep the owner the broker runs as
            os.chown(self._password_file, stat.st_uid, stat.st_gid)
        self.reload()

    def remove(self, username: str) -> None:
        if self._password_file.exists():
            self._passwd("-D", str(self._password_file), username)
            self.reload()

    def reload(self) -> None:
        if self._pid_file is None or not self._pid_file.exists():
            return  # an external broker: its operator reloads it
        try:
            os.kill(int(self._pid_file.read_text().strip()), signal.SIGHUP)
        except (ValueError, ProcessLookupError) as exc:
            raise BrokerAccountError(f"cannot reload broker from pid file {self._pid_file}: {exc}") from None
