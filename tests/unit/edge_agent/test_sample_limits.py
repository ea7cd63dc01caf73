"""Rolling hourly window and the persisted per-UTC-day quota."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_agent.sample_limits import DailyQuota, RollingWindow


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class WallClock:
    def __init__(self, when: datetime) -> None:
        self.when = when

    def __call__(self) -> datetime:
        return self.when


def test_rolling_window_limits_and_refills() -> None:
    clock = Clock()
    w = RollingWindow(2, period=3600, clock=clock)
    assert w.allows()
    w.add()
    clock.t += 100
    w.add()
    assert not w.allows() and len(w) == 2
    assert w.retry_after() == pytest.approx(3500)
    clock.t += 3500  # the first event is now exactly an hour old
    assert w.allows() and w.retry_after() == 0.0 and len(w) == 1


def test_rolling_window_zero_allows_nothing_and_limit_can_shrink() -> None:
    clock = Clock()
    assert not RollingWindow(0, clock=clock).allows()
    w = RollingWindow(3, period=60, clock=clock)
    for _ in range(3):
        w.add()
        clock.t += 10
    w.limit = 1  # a sampling-config command lowered it: all three must age out, the last at t+60
    assert not w.allows()
    assert w.retry_after() == pytest.approx(60 - 10)
    with pytest.raises(ValueError):
        RollingWindow(-1)


def test_daily_quota_counts_per_key(tmp_path: Path) -> None:
    q = DailyQuota({"a": 2, "b": 1}, tmp_path / "q.json", now=WallClock(datetime(2025, 3, 1, 12, tzinfo=UTC)))
    assert q.remaining("a") == 2 and q.remaining("b") == 1 and q.remaining("unknown") == 0
    q.add("a")
    q.add("a")
    q.add("b")
    assert q.remaining("a") == 0 and q.used("a") == 2 and q.remaining("b") == 0
    assert q.snapshot(["a", "b", "c"]) == {"a": 2, "b": 1, "c": 0}


def test_daily_quota_survives_a_restart_the_same_day_and_resets_the_next(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    wall = WallClock(datetime(2025, 3, 1, 23, 59, 30, tzinfo=UTC))
    first = DailyQuota({"a": 3}, path, now=wall)
    first.add("a")
    first.add("a")
    assert json.loads(path.read_text()) == {"day": "2025-03-01", "counts": {"a": 2}}
    again = DailyQuota({"a": 3}, path, now=wall)  # the agent restarted
    assert again.used("a") == 2 and again.remaining("a") == 1
    assert again.seconds_to_reset() == pytest.approx(30)
    wall.when += timedelta(seconds=31)  # past midnight UTC, no restart
    assert again.used("a") == 0 and again.remaining("a") == 3
    later = DailyQuota({"a": 3}, path, now=wall)  # restart on the new day with yesterday's file
    assert later.used("a") == 0


def test_day_is_the_utc_day_whatever_the_local_offset(tmp_path: Path) -> None:
    from datetime import timezone

    plus2 = timezone(timedelta(hours=2))
    wall = WallClock(datetime(2025, 3, 2, 1, 0, tzinfo=plus2))  # 23:00 UTC on March 1st
    q = DailyQuota({"a": 1}, tmp_path / "q.json", now=wall)
    q.add("a")
    assert json.loads((tmp_path / "q.json").read_text())["day"] == "2025-03-01"
    assert q.seconds_to_reset() == pytest.approx(3600)


@pytest.mark.parametrize("content", ["not json", "[]", '{"day": "yesterday", "counts": {}}', '{"day": "2025-03-01"}'])
def test_unreadable_state_starts_the_day_again(tmp_path: Path, content: str) -> None:
    path = tmp_path / "q.json"
    path.write_text(content)
    q = DailyQuota({"a": 2}, path, now=WallClock(datetime(2025, 3, 1, tzinfo=UTC)))
    assert q.used("a") == 0
    q.add("a")
    assert json.loads(path.read_text())["counts"] == {"a": 1}


def test_quota_without_a_path_is_in_memory() -> None:
    q = DailyQuota({"a": 1})
    q.add("a")
    assert q.remaining("a") == 0
    with pytest.raises(ValueError):
        DailyQuota({"a": -1})
