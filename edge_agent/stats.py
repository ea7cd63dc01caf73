"""Rolling latency and rate statistics for heartbeats and shadow reports."""

from __future__ import annotations

from collections import deque

import numpy as np


class LatencyWindow:
    def __init__(self, size: int = 1000) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        self._values.append(ms)

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(np.fromiter(self._values, float), q)) if self._values else None

    def __len__(self) -> int:
        return len(self._values)
