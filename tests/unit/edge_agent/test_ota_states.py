"""The OTA state table: allowed transitions, refused ones, and its reachability properties."""

from __future__ import annotations

import itertools

import pytest

from edge_agent.ota.states import (
    ABORTABLE,
    GIVE_UP,
    RESTING,
    TRANSITIONS,
    Event,
    InvalidTransition,
    State,
    next_state,
)

TERMINAL = {State.REJECTED, State.FAILED, State.ROLLED_BACK}
NOT_IN_TABLE = [(s, e) for s, e in itertools.product(State, Event) if (s, e) not in TRANSITIONS]



@pytest.mark.parametrize(("state", "event"), NOT_IN_TABLE, ids=lambda x: str(x))
def test_every_pair_outside_the_table_raises(state: State, event: Event) -> None:
    with pytest.raises(InvalidTransition) as info:
        next_state(state, event)
    assert info.value.state is state and info.value.event is event
    assert event.value in str(info.value) and state.value in str(info.value)



@pytest.mark.parametrize(("pair", "target"), list(TRANSITIONS.items()), ids=lambda x: str(x))
def test_every_pair_in_the_table_returns_its_target(pair, target) -> None:
    assert next_state(*pair) is target


def test_happy_path_with_shadow() -> None:
    state = State.IDLE
    path = [state]
    for event in (Event.DEPLOY, Event.DOWNLOADED, Event.VERIFIED, Event.START_SHADOW,
                  Event.SHADOW_PASSED, Event.SWITCHED, Event.HEALTHY):
        state = next_state(state, event)
        path.append(state)
    assert path == [State.IDLE, State.DOWNLOADING, State.VERIFYING, State.STAGED, State.SHADOWING,
                    State.PROMOTING, State.CHECKING, State.ACTIVE]


def test_direct_mode_skips_shadow_but_not_the_health_window() -> None:
    state = State.IDLE
    for event in (Event.DEPLOY, Event.DOWNLOADED, Event.VERIFIED, Event.PROMOTE, Event.SWITCHED):
        state = next_state(state, event)
    assert state is State.CHECKING
    assert next_state(state, Event.HEALTHY) is State.ACTIVE


def test_unhealthy_switch_rolls_back_by_itself() -> None:
    assert next_state(State.CHECKING, Event.UNHEALTHY) is State.ROLLING_BACK
    assert next_state(State.ROLLING_BACK, Event.SWITCHED) is State.ROLLED_BACK
    # Nothing older on disk: the update fails instead of pretending to roll back.
    assert next_state(State.CHECKING, Event.NO_FALLBACK) is State.FAILED


@pytest.mark.parametrize("state", sorted(RESTING | {State.CHECKING}))
def test_signed_rollback_with_the_slot_on_disk_switches_at_once(state: State) -> None:
    assert next_state(state, Event.ROLLBACK) is State.ROLLING_BACK


@pytest.mark.parametrize("state", sorted(RESTING))
def test_signed_rollback_without_the_slot_fetches_the_bundle_then_switches_as_a_rollback(state: State) -> None:
    path = [state]
    for event in (Event.ROLLBACK_FETCH, Event.DOWNLOADED, Event.VERIFIED, Event.ROLLBACK, Event.SWITCHED):
        path.append(next_state(path[-1], event))
    assert path[1:] == [State.DOWNLOADING, State.VERIFYING, State.STAGED, State.ROLLING_BACK,
                        State.ROLLED_BACK]


def test_no_rollback_while_a_candidate_is_downloading_shadowing_or_switching() -> None:
    # The runtime aborts an abortable update first, and lets PROMOTING / ROLLING_BACK finish.
    for state in ABORTABLE - {State.STAGED} | {State.PROMOTING, State.ROLLING_BACK}:
        with pytest.raises(InvalidTransition):
            next_state(state, Event.ROLLBACK)


@pytest.mark.parametrize(
    ("state", "event", "target"),
    [
        (State.DOWNLOADING, Event.DOWNLOAD_FAILED, State.FAILED),
        (State.VERIFYING, Event.VERIFY_FAILED, State.REJECTED),
        (State.SHADOWING, Event.SHADOW_FAILED, State.REJECTED),
        (State.PROMOTING, Event.SWITCH_FAILED, State.ROLLED_BACK),
        (State.ROLLING_BACK, Event.SWITCH_FAILED, State.FAILED),
        (State.SHADOWING, Event.ABORT, State.REJECTED),
    ],
)
def test_failure_exits(state: State, event: Event, target: State) -> None:
    assert next_state(state, event) is target


def test_cannot_skip_verification_or_promote_while_downloading() -> None:
    for event in (Event.VERIFIED, Event.PROMOTE, Event.SWITCHED, Event.START_SHADOW):
        with pytest.raises(InvalidTransition):
            next_state(State.DOWNLOADING, event)
    with pytest.raises(InvalidTransition):
        next_state(State.PROMOTING, Event.ABORT)  # the switch is under way; it succeeds or rolls back


@pytest.mark.parametrize("state", sorted(set(State) - RESTING))
def test_every_non_resting_state_has_a_direct_exit_to_an_end(state: State) -> None:
    exits = {target for (s, _), target in TRANSITIONS.items() if s is state}
    assert exits & (TERMINAL | {State.ACTIVE}), f"{state} cannot end an update"
    assert exits & TERMINAL, f"{state} has no failure exit"


def _reachable(state: State) -> set[State]:
    reachable, frontier = {state}, [state]
    while frontier:
        s = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is s and dst not in reachable:
                reachable.add(dst)
                frontier.append(dst)
    return reachable


@pytest.mark.parametrize("state", sorted(set(State) - RESTING - {State.ROLLING_BACK}))
def test_every_update_state_reaches_active_and_a_terminal_state(state: State) -> None:
    reachable = _reachable(state)
    assert State.ACTIVE in reachable
    assert reachable & TERMINAL


def test_rolling_back_ends_rolled_back_or_failed_and_never_loops_by_itself() -> None:
    exits = {dst for (src, _), dst in TRANSITIONS.items() if src is State.ROLLING_BACK}
    assert exits == {State.ROLLED_BACK, State.FAILED}


def test_every_cycle_passes_through_a_resting_state() -> None:
    # No chain of automatic transitions can loop: every cycle needs a new command from the server.
    in_flight = set(State) - RESTING
    for start in in_flight:
        seen, frontier = set(), [start]
        while frontier:
            s = frontier.pop()
            for (src, _), dst in TRANSITIONS.items():
                if src is s and dst in in_flight and dst not in seen:
                    assert dst is not start, f"{start} can reach itself without resting"
                    seen.add(dst)
                    frontier.append(dst)


@pytest.mark.parametrize("state", sorted(set(State) - RESTING))
def test_every_in_flight_state_has_a_give_up_exit_in_the_table(state: State) -> None:
    assert state in GIVE_UP, f"{state} has no exit for an update that keeps crashing the agent"
    assert (state, GIVE_UP[state]) in TRANSITIONS


def test_give_up_exits_only_lead_away_from_the_update() -> None:
    for state, event in GIVE_UP.items():
        target = next_state(state, event)
        assert target in TERMINAL or target is State.ROLLING_BACK, (state, target)


@pytest.mark.parametrize("state", sorted(RESTING))
def test_every_resting_state_accepts_deploy(state: State) -> None:
    assert next_state(state, Event.DEPLOY) is State.DOWNLOADING


@pytest.mark.parametrize("state", sorted(set(State) - RESTING))
def test_no_deploy_while_an_update_is_in_flight(state: State) -> None:
    with pytest.raises(InvalidTransition):
        next_state(state, Event.DEPLOY)
