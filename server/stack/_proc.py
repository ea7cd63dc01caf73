"""Process and file helpers shared by the embedded services (POSIX)."""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from firmware_bundles.fsutil import atomic_write_bytes
from server.stack.errors import ServiceError


def find_binary(name: str, *, extra_dirs: tuple[Path, ...] = ()) -> str | None:
    """Locate an executable: next to this Python first (a venv's ``bin``), then the given
    folders, then ``PATH`` plus the sbin folders that a non-login ``PATH`` may lack."""
    candidates = [Path(sys.executable).parent, Path(sys.prefix) / "bin", *extra_dirs]
    for folder in candidates:
        found = shutil.which(name, path=str(folder))
        if found:
            return found
    path = os.environ.get("PATH", os.defpath)
    return shutil.which(name, path=os.pathsep.join([path, "/usr/local/sbin", "/usr/sbin", "/sbin"]))


def random_secret(length: int = 32) -> str:
    """A random secret of URL-, shell- and config-safe characters."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def random_access_key(length: int = 20) -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` atomically (temp file, fsync, rename) with ``mode`` (default 0600)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    # state is the field after the parenthesised command name
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def pid_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pid_matches(pid: int | None, *needles: str) -> bool:
    """Whether ``pid`` is alive and its command line contains every needle (guards
    against signalling an unrelated process that reused a saved pid)."""
    if not pid_alive(pid):
        return False
    assert pid is not None
    cmdline = pid_cmdline(pid)
    if cmdline is None:
        return True  # cannot tell without procfs; the pid is alive
    joined = "\0".join(cmdline)
    return all(needle in joined for needle in needles)


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop_process(
    name: str,
    pid: int,
    popen: subprocess.Popen | None = None,
    *,
    timeout: float = 20.0,
    kill_timeout: float = 5.0,
) -> None:
    """SIGTERM ``pid``, wait up to ``timeout`` s for it to exit, then SIGKILL it."""

    def gone() -> bool:
        if popen is not None:
            return popen.poll() is not None
        return not pid_alive(pid)

    if gone():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait(gone, timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait(gone, kill_timeout):
        raise ServiceError(f"{name} (pid {pid}) did not exit after SIGKILL")


def _wait(done, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


_LIVE: weakref.WeakSet = weakref.WeakSet()


def register_exit_stop(service: Any) -> None:
    """Stop ``service`` (``.stop(timeout=...)``) when the interpreter exits, unless it was
    stopped before: a non-detached service must not outlive the process that started it."""
    _LIVE.add(service)


def unregister_exit_stop(service: Any) -> None:
    _LIVE.discard(service)


@atexit.register
def _stop_live_services() -> None:  # pragma: no cover - exit path
    for service in list(_LIVE):
        with contextlib.suppress(Exception):
            service.stop(timeout=5.0)


def spawn_service(service: Any, argv: list[str], *, output: Path, cwd: Path, pid_file: Path,
                  detach: bool) -> subprocess.Popen:
    """Start ``argv`` in its own session with output appended to ``output``, record its pid,
    and (unless detached) make sure ``service.stop()`` runs at interpreter exit."""
    with open(output, "ab") as out:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd,
            start_new_session=True, close_fds=True,
        )
    write_private(pid_file, f"{popen.pid}\n", mode=0o644)
    if not detach:
        register_exit_stop(service)
    return popen
