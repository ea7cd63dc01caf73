"""What keeps a large wave from swamping the server (server/rollouts/plan.py): the shadow window
size a wave asks of each device (the rollout's own for a small wave; for a large one, long enough
that all the wave's reports together stay within the policy's rate, checked by simulating fleets
of mixed frame rates), resends that back off, and no resend of what a device's heartbeat shows done."""

from __future__ import annotations

import math
import random

import pytest

from server.rollouts.plan import ASSUMED_FPS, shadow_window_frames


def test_a_small_wave_keeps_the_rollout_s_window():
    assert shadow_window_frames(100, 20, 25.0, 400) == 100
    assert shadow_window_frames(100, 1, None, 400) == 100


def test_a_large_wave_is_asked_for_longer_windows():
    # 10,000 devices at 20 fps with 100-frame windows would send 2,000 reports/s; at 400/s each
    # device must report every 25 s: 500 frames.
    assert shadow_window_frames(100, 10_000, 20.0, 400) == 500
    assert shadow_window_frames(100, 10_000, None, 400) == math.ceil(ASSUMED_FPS * 10_000 / 400)
    for bad in (0.0, -3.0, float("nan"), float("inf")):
        assert shadow_window_frames(100, 10_000, bad, 400) == 500  # an unusable rate: the assumed one


@pytest.mark.parametrize("seed", range(20))
def test_a_simulated_wave_never_sends_more_than_the_rate_in_all(seed):
    rng = random.Random(seed)
    devices = rng.choice([10, 300, 2_000, 10_000, 50_000])
    limit = rng.choice([50.0, 400.0, 2_000.0])
    base = rng.choice([20, 100, 300])
    rates = [rng.choice([None, rng.uniform(1, 60)]) for _ in range(devices)]
    windows = [shadow_window_frames(base, devices, fps, limit) for fps in rates]
    sent = sum((fps or ASSUMED_FPS) / frames for fps, frames in zip(rates, windows, strict=True))
    assert sent <= limit * (1 + 1e-9)
    assert min(windows) >= base  # never less evidence per window than the rollout asked for
    # And no longer than needed: one frame less would break the rate for the fastest device's share.
    fastest = max((fps or ASSUMED_FPS) for fps in rates)
    needed = math.ceil(fastest * devices / limit)
    assert max(windows) == max(base, needed)


def test_resends_back_off_to_a_ceiling():
    from server.rollouts.plan import MAX_RESEND_BACKOFF, resend_due

    waits = [next(t for t in range(0, 10_000) if resend_due(n, t, 30.0)) for n in range(1, 8)]
    assert waits == [30, 60, 120, 240, 240, 240, 240]
    assert max(waits) == 30 * MAX_RESEND_BACKOFF


def test_a_heartbeat_that_shows_the_command_carried_out_stops_its_resend():
    from server.rollouts.plan import DEPLOY, PROMOTE, ROLLBACK, heartbeat_shows_effect

    assert heartbeat_shows_effect(DEPLOY, 7, active_version=6, candidate_version=7)  # staged or shadowing
    assert heartbeat_shows_effect(DEPLOY, 7, active_version=7, candidate_version=None)  # already switched
    assert not heartbeat_shows_effect(DEPLOY, 7, active_version=6, candidate_version=None)
    assert heartbeat_shows_effect(PROMOTE, 7, active_version=7, candidate_version=None)
    assert not heartbeat_shows_effect(PROMOTE, 7, active_version=6, candidate_version=7)  # still shadowing
    assert not heartbeat_shows_effect(ROLLBACK, 6, active_version=6, candidate_version=None)  # never for those
