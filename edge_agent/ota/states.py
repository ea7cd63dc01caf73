"""The update state machine as a table: ``(state, event) → state``. Pure; no I/O.

IDLE → DOWNLOADING → VERIFYING → STAGED → SHADOWING → PROMOTING → ACTIVE, with the
REJECTED, ROLLED_BACK and FAILED exits. An unhandled pair is an error, never a guess.
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
    ACTIVE = "ACTIVE"
    REJECTED = "REJECTED"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"


class Event(StrEnum):
    DEPLOY = "deploy"
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
    ABORT = "abort"
    ROLLBACK = "rollback"


# States in which no update is in flight: a new deploy may start from each of them.
RESTING = frozenset({State.IDLE, State.ACTIVE, State.REJECTED, State.ROLLED_BACK, State.FAILED})

TRANSITIONS: dict[tuple[State, Event], State] = {
    **{(s, Event.DEPLOY): State.DOWNLOADING for s in RESTING},
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.DOWNLOADING, Event.DOWNLOAD_FAILED): State.FAILED,
    (State.VERIFYING, Event.VERIFIED): State.STAGED,
    (State.VERIFYING, Event.VERIFY_FAILED): State.REJECTED,
    (State.STAGED, Event.START_SHADOW): State.SHADOWING,
    (State.STAGED, Event.PROMOTE): State.PROMOTING,
    (State.SHADOWING, Event.SHADOW_PASSED): State.PROMOTING,
    (State.SHADOWING, Event.SHADOW_FAILED): State.REJECTED,
    (State.PROMOTING, Event.SWITCHED): State.ACTIVE,
    (State.PROMOTING, Event.SWITCH_FAILED): State.ROLLED_BACK,
    **{(s, Event.ABORT): State.REJECTED
       for s in (State.DOWNLOADING, State.VERIFYING, State.STAGED, State.SHADOWING)},
    (State.ACTIVE, Event.ROLLBACK): State.ROLLED_BACK,
}

# How many times one update may re-enter a state (after crashes) before it is given up.
MAX_ENTRIES_PER_STATE = 3


class InvalidTransition(RuntimeError):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"event {event.value!r} is not allowed in state {state.value}")
        self.state, self.event = state, event


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(state, event) from None
