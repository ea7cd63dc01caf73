"""The local executor against real subprocesses: a trainer that hangs is killed (its whole
process group) at the timeout, one that exits non-zero fails with its reason, a good one
returns its result."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from server.pipeline.executor import JobFailed, LocalSubprocessExecutor


def _trainer(code: str) -> list[str]:
    """A stand-in for ``python -m training.job_runner``: the spec path comes as its last argument."""
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


HANGS = """
import json, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # holds our stdout too
print(json.dumps({"event": "stage", "stage": "train", "status": "started", "child": child.pid}), flush=True)
time.sleep(600)  # hung: no more output, never exits
"""


def test_a_hung_trainer_and_its_children_are_killed_at_the_timeout(tmp_path):
    events: list[dict] = []
    executor = LocalSubprocessExecutor(command=_trainer(HANGS), timeout_seconds=3, kill_grace_seconds=1)
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match="exceeded its 3s timeout and was killed"):
        executor.run({"out_dir": str(tmp_path / "out")}, tmp_path, events.append)
    elapsed = time.monotonic() - t0
    assert elapsed < 3 + 1 + 3, f"took {elapsed:.1f}s to give up on a 3s timeout"
    started, stage = events
    assert started["event"] == "started" and started["pid"] > 0 and stage["stage"] == "train"
    child = stage["child"]
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the trainer's child survived the timeout"
    assert "killed: the training subprocess exceeded its 3s timeout" in (tmp_path / "job.log").read_text()


def test_a_trainer_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('x', flush=True); time.sleep(600)"
    executor = LocalSubprocessExecutor(command=_trainer(code), timeout_seconds=2, kill_grace_seconds=1)
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match="timeout and was killed"):
        executor.run({}, tmp_path, lambda e: None)
    assert time.monotonic() - t0 < 2 + 1 + 3


def test_a_trainer_that_exits_non_zero_fails_with_its_error(tmp_path):
    code = ("import json, sys; print(json.dumps({'event': 'error', 'error': 'RuntimeError: evaluation broke'}));"
            "sys.exit(3)")
    with pytest.raises(JobFailed, match="RuntimeError: evaluation broke"):
        LocalSubprocessExecutor(command=_trainer(code), timeout_seconds=30).run({}, tmp_path, lambda e: None)


def test_a_trainer_that_dies_silently_fails_with_its_exit_code_and_log_tail(tmp_path):
    code = "import sys; print('Segmentation fault (core dumped)'); sys.exit(139)"
    with pytest.raises(JobFailed, match=r"exited 139; log tail:\nSegmentation fault"):
        LocalSubprocessExecutor(command=_trainer(code), timeout_seconds=30).run({}, tmp_path, lambda e: None)


def test_a_trainer_whose_stray_child_keeps_the_output_open_does_not_hold_the_job(tmp_path):
    code = ("import json, subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
            "print(json.dumps({'event': 'result', 'result': {'ok': True}}), flush=True)")
    executor = LocalSubprocessExecutor(command=_trainer(code), timeout_seconds=60, kill_grace_seconds=1)
    t0 = time.monotonic()
    assert executor.run({}, tmp_path, lambda e: None) == {"ok": True}
    assert time.monotonic() - t0 < 10


def test_a_good_trainer_returns_its_result_and_relays_events(tmp_path):
    code = ("import json, sys; spec = json.load(open(sys.argv[-1]));"
            "print('noise'); print(json.dumps({'event': 'epoch', 'epoch': 1, 'epochs': 1}));"
            "print(json.dumps({'event': 'result', 'result': {'imgsz': spec['imgsz']}}))")
    events: list[dict] = []
    result = LocalSubprocessExecutor(command=_trainer(code), timeout_seconds=30).run({"imgsz": 64}, tmp_path,
                                                                                    events.append)
    assert result == {"imgsz": 64}
    assert [e["event"] for e in events] == ["started", "epoch", "result"]
    assert json.loads((tmp_path / "spec.json").read_text()) == {"imgsz": 64}


def test_abandon_ends_a_trainer_left_behind_and_nothing_else(tmp_path):
    import subprocess

    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(spec)], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        executor = LocalSubprocessExecutor(timeout_seconds=30)
        # A pid that is not the trainer this spec started (reused, or another process) is left alone.
        assert executor.abandon({"pid": other.pid, "spec": str(spec)}) is False
        assert executor.abandon({"pid": left.pid, "spec": str(spec)}) is True
        assert left.wait(timeout=5) == -9
        assert other.poll() is None
        assert executor.abandon({"pid": left.pid, "spec": str(spec)}) is False  # gone
    finally:
        other.kill()
        other.wait()
