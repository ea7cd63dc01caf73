"""Where a retrain job's compute runs. The default is a local subprocess streaming JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


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


class LocalSubprocessExecutor:
    """Runs ``python -m training.job_runner SPEC`` and relays each progress event."""

    def __init__(self, python: str = sys.executable, timeout_seconds: int = 6 * 3600) -> None:
        self._python = python
        self._timeout = timeout_seconds

    def run(self, spec: dict, work_dir: Path, on_event: Callable[[dict], None]) -> dict:
        spec_path = work_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2, default=str))
        log_path = work_dir / "job.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        result: dict | None = None
        error = ""
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                [self._python, "-m", "training.job_runner", str(spec_path)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work_dir,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
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
            try:
                code = proc.wait(timeout=self._timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise JobFailed(f"training subprocess exceeded {self._timeout}s") from None
        if code != 0 or result is None:
            tail = log_path.read_text()[-2000:]
            raise JobFailed(error or f"training subprocess exited {code}; log tail:\n{tail}")
        return result
