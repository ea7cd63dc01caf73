"""How many samples a reason may still take: a rolling hourly window and a per-UTC-day quota.

The hourly window lives in memory (a restart forgets it; the daily quota bounds a crash loop).
The day's counts are written atomically after each change, so a restart mid-day resumes
them instead of granting a fresh quota.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import structlog

from firmware_bundles.fsutil import atomic_write_bytes

log = structlog.get_logger(__name__)

HOUR = 3600.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class RollingWindow:
    """At most ``limit`` events in any ``period`` seconds (monotonic clock). ``limit`` 0 allows none."""

    def __init__(self, limit: int, period: float = HOUR, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.limit = limit
        self._period = period
        self._clock = clock
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._times and now - self._times[0] >= self._period:
            self._times.popleft()

    def allows(self) -> bool:
        self._expire(self._clock())
        return len(self._times) < self.limit

    def add(self) -> None:
        self._times.append(self._clock())

    def retry_after(self) -> float:
        """Seconds until one more event fits (0 when one fits now)."""
        now = self._clock()
        self._expire(now)
        if len(self._times) < self.limit:
            return 0.0
        if not self._times:  # limit 0: never
            return self._period
        # The oldest event that must leave for one more to fit.
        oldest = self._times[len(self._times) - self.limit]
        return max(0.0, self._period - (now - oldest))

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._times)


class DailyQuota:
    """Per-key counts for the current UTC day, persisted (atomic write) to ``path`` when given."""

    def __init__(self, limits: Mapping[str, int], path: Path | None = None,
                 now: Callable[[], datetime] = utc_now) -> None:
        if any(v < 0 for v in limits.values()):
            raise ValueError(f"daily limits must be >= 0, got {dict(limits)}")
        self._limits = dict(limits)
        self._path = Path(path) if path is not None else None
        self._now = now
        self._day, self._counts = self._load()

    def _today(self) -> date:
        return self._now().astimezone(UTC).date()

    def _load(self) -> tuple[date, dict[str, int]]:
        today = self._today()
        if self._path is None or not self._path.exists():
            return today, {}
        try:
            state = json.loads(self._path.read_text())
            day = date.fromisoformat(state["day"])
            counts = {str(k): int(v) for k, v in state["counts"].items() if int(v) >= 0}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Only a quota: starting the day again beats refusing to start the agent.
            log.warning("quota.state_unreadable", path=str(self._path), error=str(exc))
            return today, {}
        return (day, counts) if day == today else (today, {})

    def _roll(self) -> None:
        today = self._today()
        if today != self._day:
            self._day, self._counts = today, {}

    def used(self, key: str) -> int:
        self._roll()
        return self._counts.get(key, 0)

    def remaining(self, key: str) -> int:
        return max(0, self._limits.get(key, 0) - self.used(key))

    def add(self, key: str) -> None:
        self._roll()
        self._counts[key] = self._counts.get(key, 0) + 1
        self._save()

    def seconds_to_reset(self) -> float:
        now = self._now().astimezone(UTC)
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        return (midnight - now).total_seconds()

    def snapshot(self, keys: Iterable[str]) -> dict[str, int]:
        self._roll()
        return {k: self._counts.get(k, 0) for k in keys}

    def _save(self) -> None:
        if self._path is None:
            return
        data = json.dumps({"day": self._day.isoformat(), "counts": self._counts}, sort_keys=True).encode()
        atomic_write_bytes(self._path, data)
