"""The OTA state table: allowed transitions, refused ones, and its reachability properties."""

from __future__ import annotations

import itertools

import pytest

from edge_agent.ota.states import RESTING, TRANSITIONS, Event, InvalidTransition, State, next_state

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
                  Event.SHADOW_PASSED, Event.SWITCHED):
        state = next_state(state, event)
        path.append(state)
    assert path == [State.IDLE, State.DOWNLOADING, State.VERIFYING, State.STAGED, State.SHADOWING,
                    State.PROMOTING, State.ACTIVE]


def test_direct_mode_skips_shadow() -> None:
    state = State.IDLE
    for event in (Event.DEPLOY, Event.DOWNLOADED, Event.VERIFIED, Event.PROMOTE, Event.SWITCHED):
        state = next_state(state, event)
    assert state is State.ACTIVE


@pytest.mark.parametrize(
    ("state", "event", "target"),
    [
        (State.DOWNLOADING, Event.DOWNLOAD_FAILED, State.FAILED),
        (State.VERIFYING, Event.VERIFY_FAILED, State.REJECTED),
        (State.SHADOWING, Event.SHADOW_FAILED, State.REJECTED),
        (State.PROMOTING, Event.SWITCH_FAILED, State.ROLLED_BACK),
        (State.ACTIVE, Event.ROLLBACK, State.ROLLED_BACK),
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


@pytest.mark.parametrize("state", sorted(set(State) - RESTING))
def test_every_non_resting_state_reaches_active_and_a_terminal_state(state: State) -> None:
    reachable, frontier = {state}, [state]
    while frontier:
        s = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is s and dst not in reachable:
                reachable.add(dst)
                frontier.append(dst)
    assert State.ACTIVE in reachable
    assert reachable & TERMINAL


@pytest.mark.parametrize("state", sorted(RESTING))
def test_every_resting_state_accepts_deploy(state: State) -> None:
    assert next_state(state, Event.DEPLOY) is State.DOWNLOADING


@pytest.mark.parametrize("state", sorted(set(State) - RESTING))
def test_no_deploy_while_an_update_is_in_flight(state: State) -> None:
    with pytest.raises(InvalidTransition):
        next_state(state, Event.DEPLOY)
