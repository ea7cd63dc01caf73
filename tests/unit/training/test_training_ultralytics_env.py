"""Offline guard: non-loopback network access fails at once; Ultralytics set up offline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from training import ultralytics_env as env


@pytest.mark.parametrize("host", ["10.255.255.1", "93.184.216.34", "2001:db8::1"])
def test_guard_refuses_non_loopback_connect(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with env.network_guard(), socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        with pytest.raises(env.NetworkBlockedError, match="offline"):
            s.connect((host, 443))
    assert any(host in b for b in env.blocked_attempts())


def test_guard_refuses_name_lookup() -> None:
    with env.network_guard(), pytest.raises(env.NetworkBlockedError):
        socket.getaddrinfo("github.com", 443)
    # It is an OSError, so code that treats network errors as "offline" keeps working.
    assert issubclass(env.NetworkBlockedError, OSError)


def test_guard_allows_loopback() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        with env.network_guard():
            socket.getaddrinfo("localhost", 80)
            with socket.create_connection(server.getsockname(), timeout=2):
                pass
    finally:
        server.close()


def test_guard_is_scoped() -> None:
    assert not env.guard_active()
    with env.network_guard():
        assert env.guard_active()
        with env.network_guard():
            assert env.guard_active()
        assert env.guard_active()
    assert not env.guard_active()
    # Outside a guard the hook stays out of the way (a loopback-free lookup is not refused).
    socket.getaddrinfo("127.0.0.1", 80)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        (None, True),
        ("example.com", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
    ],
)
def test_is_loopback(host: object, loopback: bool) -> None:
    assert env._is_loopback(host) is loopback


def _run(code: str, tmp_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    child_env["HOME"] = str(tmp_path / "home")  # anything written to ~ would land here, not in the real home
    child_env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env,
    )


def test_offline_ultralytics_sets_everything_up(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    proc = _run(
        f"""
        import json, os, sys
        from pathlib import Path
        from training.ultralytics_env import offline_ultralytics, cpu_count
        ul = offline_ultralytics(Path({str(cfg)!r}))
        import ultralytics.utils as u, ultralytics.utils.torch_utils as tu, torch
        from ultralytics.utils import SETTINGS
        again = offline_ultralytics(Path({str(cfg)!r}))  # idempotent
        try:
            offline_ultralytics(Path({str(cfg)!r}) / "other")
            switched = True
        except RuntimeError:
            switched = False
        print(json.dumps({{
            "same": ul is again, "online": u.ONLINE, "offline_env": os.environ["YOLO_OFFLINE"],
            "config": str(u.USER_CONFIG_DIR), "sync": SETTINGS["sync"], "wandb": SETTINGS["wandb"],
            "threads": tu.NUM_THREADS, "torch_threads": torch.get_num_threads(), "cores": cpu_count(),
            "switched": switched,
        }}))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["same"] and out["online"] is False and out["offline_env"] == "1"
    assert Path(out["config"]) == (cfg / "Ultralytics").resolve()
    assert out["sync"] is False and out["wandb"] is False
    assert out["threads"] == out["cores"] == out["torch_threads"]
    assert out["switched"] is False
    for font in ("Arial.ttf", "Arial.Unicode.ttf"):
        assert (cfg / "Ultralytics" / font).stat().st_size > 10_000
    assert not (tmp_path / "home" / ".config" / "Ultralytics").exists()


def test_refuses_ultralytics_imported_with_other_settings(tmp_path: Path) -> None:
    proc = _run(
        f"""
        import ultralytics  # imported first, with another config dir and without YOLO_OFFLINE
        from pathlib import Path
        from training.ultralytics_env import offline_ultralytics, UltralyticsAlreadyImportedError
        try:
            offline_ultralytics(Path({str(tmp_path / "cfg")!r}))
        except UltralyticsAlreadyImportedError as exc:
            print("REFUSED", exc)
        """,
        tmp_path,
        {"YOLO_CONFIG_DIR": str(tmp_path / "elsewhere")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED" in proc.stdout


def test_train_refuses_missing_weights_without_download(tmp_path: Path) -> None:
    from training import yolo

    with pytest.raises(FileNotFoundError, match="offline"):
        yolo.train(tmp_path / "data.yaml", tmp_path / "run", model="yolov8n.pt", epochs=1, imgsz=64)
