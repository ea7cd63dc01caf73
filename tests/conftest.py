"""Suite-wide options: slow tests (real training, the whole loop) run with --run-slow;
GPU tests skip with a reason on machines without an NVIDIA GPU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (real Ultralytics training, the e2e loop)")


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidia0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow") or os.environ.get("EDGELOOP_RUN_SLOW") == "1"
    gpu = _has_gpu()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: trains real models; run with --run-slow"))
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (no nvidia-smi / /dev/nvidia0 here)"))


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The demo's cache (EDGELOOP_CACHE_DIR, else ~/.cache/edgeloop): seed models train once per machine."""
    from edgeloop.paths import cache_dir

    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def ultralytics_offline(model_cache: Path):
    """Ultralytics imported once per test process, offline, with its state in the cache."""
    from training.ultralytics_env import offline_ultralytics

    return offline_ultralytics(model_cache / "ultralytics")
