"""Where edgeloop keeps caches shared between runs (seed models, golden sets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EDGELOOP_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgeloop``, else ``~/.cache/edgeloop``."""
    if os.environ.get("EDGELOOP_CACHE_DIR"):
        return Path(os.environ["EDGELOOP_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "edgeloop"
