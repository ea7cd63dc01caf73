"""The update state machine as a table: ``(state, event) → state``. Pure; no I/O.

IDLE → DOWNLOADING → VERIFYING → STAGED → SHADOWING → PROMOTING → CHECKING → ACTIVE, with the
REJECTED, ROLLED_BACK and FAILED exits. CHECKING is the post-switch health window: the new
model serves, but the update is committed (ACTIVE) only once it has proved healthy.
ROLLING_BACK switches to an older slot (after a failed health check or a signed rollback
command) and ends in ROLLED_BACK. An unhandled pair is an error, never a guess.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    SHADOWING = "SHADOWING"
    PROMOTING = "PROMOTING"
    CHECKING = "CHECKING"
    ACTIVE = "ACTIVE"
    ROLLING_BACK = "ROLLING_BACK"
    REJECTED = "REJECTED"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"


class Event(StrEnum):
    DEPLOY = "deploy"
    # A signed rollback whose target slot is gone: its bundle is fetched like a deploy.
    ROLLBACK_FETCH = "rollback_fetch"
    DOWNLOADED = "downloaded"
    DOWNLOAD_FAILED = "download_failed"
    VERIFIED = "verified"
    VERIFY_FAILED = "verify_failed"
    START_SHADOW = "start_shadow"
    PROMOTE = "promote"
    SHADOW_PASSED = "shadow_passed"
    SHADOW_FAILED = "shadow_failed"
    SWITCHED = "switched"
    SWITCH_FAILED = "switch_failed"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    # Unhealthy, but no older slot is left to roll back to.
    NO_FALLBACK = "no_fallback"
    ABORT = "abort"
    ROLLBACK = "rollback"


# States in which no update is in flight: a new deploy or rollback may start from each of them.
RESTING = frozenset({State.IDLE, State.ACTIVE, State.REJECTED, State.ROLLED_BACK, State.FAILED})
# In-flight states a server ABORT may cancel (the candidate is not serving yet).
ABORTABLE = frozenset({State.DOWNLOADING, State.VERIFYING, State.STAGED, State.SHADOWING})

TRANSITIONS: dict[tuple[State, Event], State] = {
    **{(s, Event.DEPLOY): State.DOWNLOADING for s in RESTING},
    **{(s, Event.ROLLBACK_FETCH): State.DOWNLOADING for s in RESTING},
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.DOWNLOADING, Event.DOWNLOAD_FAILED): State.FAILED,
    (State.VERIFYING, Event.VERIFIED): State.STAGED,
    (State.VERIFYING, Event.VERIFY_FAILED): State.REJECTED,
    (State.STAGED, Event.START_SHADOW): State.SHADOWING,
    (State.STAGED, Event.PROMOTE): State.PROMOTING,
    # A fetched rollback bundle is switched to as a rollback (no shadow, no health window).
    (State.STAGED, Event.ROLLBACK): State.ROLLING_BACK,
    (State.SHADOWING, Event.SHADOW_PASSED): State.PROMOTING,
    (State.SHADOWING, Event.SHADOW_FAILED): State.REJECTED,
    (State.PROMOTING, Event.SWITCHED): State.CHECKING,
    # The new model failed to load before the switch: the old one never stopped serving.
    (State.PROMOTING, Event.SWITCH_FAILED): State.ROLLED_BACK,
    (State.CHECKING, Event.HEALTHY): State.ACTIVE,
    (State.CHECKING, Event.UNHEALTHY): State.ROLLING_BACK,
    (State.CHECKING, Event.NO_FALLBACK): State.FAILED,
    (State.CHECKING, Event.ROLLBACK): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.SWITCHED): State.ROLLED_BACK,
    (State.ROLLING_BACK, Event.SWITCH_FAILED): State.FAILED,
    **{(s, Event.ABORT): State.REJECTED for s in ABORTABLE},
    **{(s, Event.ROLLBACK): State.ROLLING_BACK for s in RESTING},
}

# How many times one update may re-enter a state (after crashes) before it is given up.
MAX_ENTRIES_PER_STATE = 3

# The exit each in-flight state takes when an update keeps being interrupted there: a candidate
# that kills the agent in CHECKING is as unhealthy as it gets, so it is rolled back.
GIVE_UP: dict[State, Event] = {
    State.DOWNLOADING: Event.DOWNLOAD_FAILED,
    State.VERIFYING: Event.VERIFY_FAILED,
    State.STAGED: Event.ABORT,
    State.SHADOWING: Event.SHADOW_FAILED,
    State.PROMOTING: Event.SWITCH_FAILED,
    State.CHECKING: Event.UNHEALTHY,
    State.ROLLING_BACK: Event.SWITCH_FAILED,
}


class InvalidTransition(RuntimeError):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"event {event.value!r} is not allowed in state {state.value}")
        self.state, self.event = state, event


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(state, event) from None
