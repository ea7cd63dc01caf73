"""Pure rollout planning: the rollout's states and what operators may do in each, how many devices
a wave takes and which, and for one device what it is (from what it reported) and which command
it needs next. No database, no clock, no I/O: the controller feeds these facts in.

A device's ``goal`` is what the rollout wants of it:

- ``shadow``: run the candidate beside the active model and hold there (the wave is being judged);
- ``switch``: run the candidate (promote it once it shadows; in direct mode, install and switch);
- ``stop``: the candidate must not start serving: abort it if it has not switched (a switched
  device is left as it is: operator abort);
- ``revert``: back to the version it ran before: abort if not switched yet, else a signed
  rollback (a failed wave, an operator rollback).

Agent OTA states (edge_agent/ota/states.py) are matched by name: the server never imports the agent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# ------------------------------------------------------------------ rollout states

PENDING, AWAITING_APPROVAL, RUNNING, PAUSED = "pending", "awaiting_approval", "running", "paused"
SUCCEEDED, ABORTED, ROLLED_BACK = "succeeded", "aborted", "rolled_back"
ROLLOUT_STATES = (PENDING, AWAITING_APPROVAL, RUNNING, PAUSED, SUCCEEDED, ABORTED, ROLLED_BACK)
ACTIVE = frozenset({PENDING, AWAITING_APPROVAL, RUNNING, PAUSED})
FINISHED = frozenset({SUCCEEDED, ABORTED, ROLLED_BACK})

# Agent states in which a new deploy is accepted (edge_agent/ota/states.py RESTING; "" = never updated).
RESTING_UPDATE_STATES = frozenset({"", "IDLE", "ACTIVE", "REJECTED", "ROLLED_BACK", "FAILED"})

# Wave states, and the phases of a running wave.
WAVE_PENDING, WAVE_RUNNING, WAVE_PASSED, WAVE_FAILED = "pending", "running", "passed", "failed"
PHASE_SHADOW, PHASE_SWITCH = "shadow", "switch"

# Operator actions: the states each is allowed from, and the state it leads to.
ACTIONS: dict[str, tuple[frozenset[str], str]] = {
    "approve": (frozenset({AWAITING_APPROVAL}), RUNNING),
    "pause": (frozenset({PENDING, RUNNING}), PAUSED),
    "resume": (frozenset({PAUSED}), RUNNING),
    "abort": (ACTIVE, ABORTED),
    "rollback": (ACTIVE | {SUCCEEDED, ABORTED}, ROLLED_BACK),
}


class RolloutConflict(ValueError):
    """An operator action the rollout's state does not allow (the API answers 409 with this)."""


def operator_transition(state: str, action: str) -> str:
    allowed, target = ACTIONS[action]
    if state not in allowed:
        raise RolloutConflict(f"cannot {action} a rollout that is {state.replace('_', ' ')}"
                              f" (allowed when {' or '.join(sorted(s.replace('_', ' ') for s in allowed))})")
    return target


# ------------------------------------------------------------------ waves


def wave_quota(percent: float | None, count: int | None, fleet_size: int, assigned_before: int,
               in_wave: int) -> int:
    """How many more devices the wave takes now. ``percent`` is the cumulative share of the fleet
    (every device assigned so far plus those still eligible) reached by the end of the wave;
    ``count`` the wave's own size. ``assigned_before``: devices of earlier waves; ``in_wave``:
    devices this wave has already."""
    if count is not None:
        return max(0, count - in_wave)
    target = math.ceil(fleet_size * (percent or 0) / 100 - 1e-9)
    return max(0, target - assigned_before - in_wave)


@dataclass(frozen=True)
class Candidate:
    device_id: str
    online: bool
    active_version: int | None


def choose(candidates: Sequence[Candidate], n: int, *, last_wave: bool) -> list[str]:
    """The ``n`` devices a wave takes: online ones with a model to shadow against, in id order (a
    stable, explainable order). A device with no model yet has nothing to compare a candidate
    with, so it only joins the last wave."""
    pool = [c for c in candidates if c.online and (last_wave or c.active_version is not None)]
    pool.sort(key=lambda c: (c.active_version is None, c.device_id))
    return [c.device_id for c in pool[:max(0, n)]]


# ------------------------------------------------------------------ devices

SHADOW, SWITCH, STOP, REVERT = "shadow", "switch", "stop", "revert"
DEPLOY, PROMOTE, ABORT, ROLLBACK = "deploy", "promote", "abort", "rollback"

# Device states as the API shows them.
D_PENDING, D_DEPLOYING, D_SHADOWING, D_PROMOTING, D_ACTIVE = "pending", "deploying", "shadowing", "promoting", "active"
D_FAILED, D_ABORTING, D_ABORTED, D_ROLLING_BACK, D_ROLLED_BACK = (
    "failed", "aborting", "aborted", "rolling_back", "rolled_back")

# Agent OTA states; "" and "sent" mean the device has not reported on the command yet.
_NOT_STARTED = frozenset({"", "sent"})
_INSTALLING = frozenset({"DOWNLOADING", "VERIFYING", "STAGED"})
ABORTABLE = _NOT_STARTED | _INSTALLING | {"SHADOWING"}
SWITCHED = frozenset({"CHECKING", "ACTIVE"})  # the candidate serves


@dataclass(frozen=True)
class DeviceFacts:
    goal: str
    update_state: str = ""  # the agent's state for our deploy command
    rollback_state: str = ""  # ... and for our rollback command
    deployed: bool = False
    promoted: bool = False
    aborted: bool = False
    rolled_back: bool = False
    from_version: int | None = None
    failure: str = ""
    reason: str = ""  # the agent's last reason


def device_state(f: DeviceFacts) -> str:
    obs = f.update_state
    if f.rolled_back:
        return {"ROLLED_BACK": D_ROLLED_BACK, "FAILED": D_FAILED}.get(f.rollback_state, D_ROLLING_BACK)
    if not f.deployed:
        return D_PENDING if f.goal in (SHADOW, SWITCH) else D_ABORTED
    if obs in _NOT_STARTED or obs in _INSTALLING:
        return D_ABORTING if f.aborted else D_DEPLOYING
    if obs == "SHADOWING":
        return D_ABORTING if f.aborted else D_PROMOTING if f.promoted else D_SHADOWING
    if obs in ("PROMOTING", "CHECKING"):
        return D_PROMOTING
    if obs == "ACTIVE":
        return D_ACTIVE
    if obs == "ROLLING_BACK":
        return D_ROLLING_BACK
    if obs == "REJECTED":
        return D_ABORTED if f.aborted else D_FAILED
    if obs == "ROLLED_BACK":
        return D_ROLLED_BACK
    return D_FAILED  # FAILED, or a state this server does not know


def observed_failure(f: DeviceFacts) -> str:
    """The failure the device's own reports show ('' for none)."""
    why = f": {f.reason}" if f.reason else ""
    if f.rolled_back and f.rollback_state == "FAILED":
        return f"rollback failed{why}"
    if f.update_state == "REJECTED" and not f.aborted:
        return f"the device refused the candidate{why}"
    if f.update_state == "FAILED":
        return f"install failed{why}"
    if f.update_state == "ROLLED_BACK" and not f.rolled_back:
        return f"the device switched back by itself{why}"
    return ""


def next_command(f: DeviceFacts) -> str | None:
    """The one command the device needs now to move toward its goal, if any."""
    obs = f.update_state
    if f.goal in (SHADOW, SWITCH):
        if f.failure:
            return None
        if not f.deployed:
            return DEPLOY
        if f.goal == SWITCH and obs == "SHADOWING" and not f.promoted:
            return PROMOTE
        return None
    if not f.deployed:
        return None
    if obs in ABORTABLE and not f.aborted:
        return ABORT
    if f.goal == REVERT and obs in SWITCHED and not f.rolled_back and f.from_version is not None:
        return ROLLBACK
    return None


def effect_seen(kind: str, f: DeviceFacts) -> bool:
    """Whether the device has visibly acted on its ``kind`` command (else it may be sent again)."""
    if kind == DEPLOY:
        return f.update_state not in _NOT_STARTED
    if kind == PROMOTE:
        return f.update_state != "SHADOWING"
    if kind == ABORT:
        return f.update_state not in ABORTABLE
    return f.rollback_state != ""


# A command sent n times waits resend_seconds x 2^(n-1) before its next send, at most this many times
# resend_seconds: when devices are slow to answer because the server is behind on their reports,
# resends back off instead of piling onto the backlog they wait behind.
MAX_RESEND_BACKOFF = 8


def resend_due(sends: int, seconds_since_sent: float, resend_seconds: float) -> bool:
    """Whether a command sent ``sends`` times, last ``seconds_since_sent`` ago, is due again."""
    factor = min(2 ** max(sends - 1, 0), MAX_RESEND_BACKOFF)
    return seconds_since_sent >= resend_seconds * factor


def heartbeat_shows_effect(kind: str, version: int, active_version: int | None,
                           candidate_version: int | None) -> bool:
    """The device's latest heartbeat already shows what the command asked for (the candidate loaded
    for a deploy, serving for a promote) though its update events have not been read yet: a server
    behind on a large wave's events must not resend what devices have long carried out."""
    if kind == DEPLOY:
        return version in (active_version, candidate_version)
    if kind == PROMOTE:
        return active_version == version
    return False


def worth_resending(kind: str, f: DeviceFacts) -> bool:
    """A sent command the device has not acted on that the goal still calls for."""
    if effect_seen(kind, f):
        return False
    if kind == DEPLOY:
        return f.goal in (SHADOW, SWITCH) and not f.failure and not f.aborted
    if kind == PROMOTE:
        return f.goal == SWITCH
    if kind == ABORT:
        return f.goal in (STOP, REVERT)
    return f.goal == REVERT


def settled(f: DeviceFacts) -> bool:
    """Nothing more will happen to the device for its current goal."""
    state = device_state(f)
    if state in (D_ABORTED, D_ROLLED_BACK, D_FAILED):
        return True
    if state == D_ACTIVE:
        # A switched device to revert waits for its rollback, unless it has nothing to go back to.
        return f.goal != REVERT or f.from_version is None
    if state == D_SHADOWING:
        return f.goal == SHADOW  # holding, as the wave's judgement wants
    return False


def runs_candidate(f: DeviceFacts) -> bool:
    return device_state(f) == D_ACTIVE


# ------------------------------------------------------------------ shadow window size

# A device's frame rate when it has not reported one yet (the agent's heartbeat carries it).
ASSUMED_FPS = 20.0


def shadow_window_frames(base: int, wave_devices: int, fps: float | None, max_reports_per_second: float) -> int:
    """Frames per shadow window to ask of one device of a wave: the rollout's own ``base``, or more
    when the wave is so large that windows of ``base`` frames would send more than
    ``max_reports_per_second`` shadow reports in all.

    A device at ``fps`` frames a second sends ``fps / frames`` windows a second, so with
    ``frames >= fps * n / max`` a wave of ``n`` devices sends at most ``max`` in all, whatever each
    device's rate. The evidence is the same frames, in fewer and larger windows: the gates count
    frames, not windows, so a device needs as long in shadow as before."""
    rate = fps if fps is not None and math.isfinite(fps) and fps > 0 else ASSUMED_FPS
    needed = math.ceil(rate * max(wave_devices, 1) / max_reports_per_second)
    return max(base, min(needed, 1_000_000))
