"""Where a retrain job's compute runs. The default is a local subprocess streaming JSON lines."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class JobFailed(RuntimeError):
    pass


def parse_event(line: str) -> dict | None:
    """One job-runner progress event from a line of its output, or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def make_executor(settings, store):
    """The executor ``settings.executor`` names: ``local`` (default) or ``kubernetes``."""
    if settings.executor == "kubernetes":
        from server.pipeline.k8s_executor import KubernetesJobExecutor

        return KubernetesJobExecutor.from_settings(settings, store)
    return LocalSubprocessExecutor(timeout_seconds=settings.training.timeout_seconds)


_EOF = object()


def _pump(stream, lines: queue.Queue) -> None:
    """Reader thread: every line of the child's output, then ``_EOF``. It never blocks the caller."""
    try:
        for line in stream:
            lines.put(line)
    except (OSError, ValueError):  # the pipe was closed under us after a kill
        pass
    finally:
        lines.put(_EOF)


def kill_process_group(proc: subprocess.Popen, grace_seconds: float = 5.0) -> None:
    """SIGTERM the child's whole process group (the trainer and its dataloader workers), then
    SIGKILL what is left after ``grace_seconds``. The child must lead its own session."""
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure no straggler of its group survives it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


class LocalSubprocessExecutor:
    """Runs ``python -m training.job_runner SPEC`` and relays each progress event.

    The child's output is read on a thread so the wall-clock limit holds even when the trainer
    hangs without printing: past ``timeout_seconds`` its whole process group is killed and the
    run fails with that reason.
    """

    def __init__(self, python: str = sys.executable, timeout_seconds: int = 6 * 3600,
                 command: Sequence[str] | None = None, kill_grace_seconds: float = 5.0) -> None:
        self._command = list(command) if command is not None else [python, "-m", "training.job_runner"]
        self._timeout = timeout_seconds
        self._grace = kill_grace_seconds

    def run(self, spec: dict, work_dir: Path, on_event: Callable[[dict], None]) -> dict:
        spec_path = work_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2, default=str))
        log_path = work_dir / "job.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        result: dict | None = None
        error = ""
        deadline = time.monotonic() + self._timeout
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                [*self._command, str(spec_path)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work_dir,
                start_new_session=True,  # its own process group: a timeout kills its workers too
            )
            assert proc.stdout is not None
            # Where it runs: a restarted server ends a trainer the old one left behind (``abandon``).
            on_event({"event": "started", "executor": "local", "pid": proc.pid, "spec": str(spec_path)})
            lines: queue.Queue = queue.Queue()
            reader = threading.Thread(target=_pump, args=(proc.stdout, lines), name="job-output", daemon=True)
            reader.start()
            exited: float | None = None
            try:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    try:
                        line = lines.get(timeout=min(left, 1.0))
                    except queue.Empty:
                        if proc.poll() is not None:
                            # The trainer exited but something it started still holds its output
                            # open: give that a moment, then end the group instead of waiting on it.
                            exited = exited or time.monotonic()
                            if time.monotonic() - exited > self._grace:
                                kill_process_group(proc, 0)
                        continue
                    if line is _EOF:
                        break
                    log_file.write(line)
                    log_file.flush()  # readable while the job runs
                    event = parse_event(line)
                    if event is None:
                        continue
                    if event.get("event") == "result":
                        result = event["result"]
                    elif event.get("event") == "error":
                        error = event.get("error", "")
                    on_event(event)
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except (TimeoutError, subprocess.TimeoutExpired):
                kill_process_group(proc, self._grace)
                log_file.write(f"\nkilled: the training subprocess exceeded its {self._timeout}s timeout\n")
                log.warning("executor.timeout", pid=proc.pid, timeout=self._timeout)
                raise JobFailed(f"training subprocess exceeded its {self._timeout}s timeout and was killed "
                                f"(process group {proc.pid})") from None
            except BaseException:
                kill_process_group(proc, self._grace)  # e.g. on_event failed: never leave a trainer behind
                raise
            finally:
                reader.join(timeout=5)
                proc.stdout.close()
        if code != 0 or result is None:
            tail = log_path.read_text()[-2000:]
            raise JobFailed(error or f"training subprocess exited {code}; log tail:\n{tail}")
        return result

    def abandon(self, started: dict) -> bool:
        """End the trainer a ``started`` event named, if it still runs (see :func:`end_stale_trainer`)."""
        return end_stale_trainer(started)


def end_stale_trainer(started: dict) -> bool:
    """Kill the process group of the local trainer a ``started`` event named, if it still runs (a
    server that died left it behind). True when there was one to end. The pid is checked to be
    that trainer (its command line holds the job's spec path), not a process that reused it."""
    if started.get("executor", "local") != "local":
        return False
    pid = int(started.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not started.get("spec") or started["spec"].encode() not in cmdline:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    log.warning("executor.abandoned", pid=pid, spec=started.get("spec"))
    return True
