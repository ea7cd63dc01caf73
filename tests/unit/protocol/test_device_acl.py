"""protocol.device_may: the device ACL model a per-operation broker (EMQX's HTTP authorizer) is
answered with, checked against the Mosquitto ``pattern`` lines acl_patterns() writes, for every
channel, both operations, own and other devices' topics, wildcards and shared subscriptions."""

from __future__ import annotations

import itertools

import pytest

from protocol import device_may as exported_device_may
from protocol.topics import TOPIC_ROOT, Channel, acl_patterns, device_may, device_topic, topic_spec

ME, OTHER = "cam-7", "cam-8"
ACTIONS = ("publish", "subscribe")


def _granted_by_patterns(username: str) -> set[tuple[str, str]]:
    """(action, topic) pairs the acl_patterns() lines grant ``username``, read as Mosquitto reads
    them: ``pattern write T`` allows publishing T, ``pattern read T`` subscribing to it, ``%u``
    replaced by the user name."""
    action_of = {"write": "publish", "read": "subscribe"}
    granted = set()
    for line in acl_patterns():
        keyword, access, topic = line.split(" ")
        assert keyword == "pattern" and access in action_of, line
        granted.add((action_of[access], topic.replace("%u", username)))
    return granted


@pytest.mark.parametrize("channel", list(Channel))
@pytest.mark.parametrize("action", ACTIONS)
def test_every_channel_and_action_matches_the_mosquitto_patterns(channel: Channel, action: str) -> None:
    own = device_topic(ME, channel)
    expected = (action, own) in _granted_by_patterns(ME)
    assert device_may(ME, own, action) is expected
    # And from the topic spec itself: devices publish their own channels, subscribe to the server's.
    assert expected is ((action == "publish") == (topic_spec(channel).publisher == "device"))
    # Another device's topic: never, whatever the channel and operation.
    assert device_may(ME, device_topic(OTHER, channel), action) is False
    assert device_may(OTHER, device_topic(OTHER, channel), action) is expected


def test_the_grid_agrees_with_the_patterns_everywhere() -> None:
    """Every (user, topic, action) of a grid of own/other topics, odd topics and filters: allowed
    exactly when the patterns grant that very topic to that user."""
    topics = [device_topic(d, c) for d, c in itertools.product((ME, OTHER), Channel)]
    topics += [
        f"{TOPIC_ROOT}/{ME}/+", f"{TOPIC_ROOT}/{ME}/#", f"{TOPIC_ROOT}/+/commands", f"{TOPIC_ROOT}/#", "#", "+",
        f"$share/g/{TOPIC_ROOT}/{ME}/commands", f"$queue/{TOPIC_ROOT}/{ME}/commands", "$SYS/brokers",
        f"{TOPIC_ROOT}/{ME}/commands/", f"{TOPIC_ROOT}/{ME}/commands/x", f"{TOPIC_ROOT}/{ME}", f"{TOPIC_ROOT}/{ME}/",
        f"{TOPIC_ROOT}/{ME}/firmware", f"{TOPIC_ROOT}/{ME}/Status", f"{TOPIC_ROOT}//commands", "",
        f"/{TOPIC_ROOT}/{ME}/status", f"{TOPIC_ROOT}/{ME}/status\0", f"{TOPIC_ROOT}/{ME}\0/status",
        f"edgeloop/v2/devices/{ME}/status",
    ]
    for user in (ME, OTHER):
        granted = _granted_by_patterns(user)
        for topic, action in itertools.product(topics, (*ACTIONS, "all", "read", "write", "")):
            assert device_may(user, topic, action) is ((action, topic) in granted), (user, topic, action)


@pytest.mark.parametrize("username", ["", "_edgeloop-server", "Cam-7", "cam/7", "cam+7", "cam#7", "cam-7\n",
                                      "a" * 64, "%u", "cam 7"])
def test_a_user_name_that_is_not_a_device_id_gets_nothing(username: str) -> None:
    for channel, action in itertools.product(Channel, ACTIONS):
        # The topic built by hand: device_topic would refuse the name.
        assert device_may(username, f"{TOPIC_ROOT}/{username}/{channel.value}", action) is False


def test_wildcards_and_shared_subscriptions_are_denied_even_on_own_topics() -> None:
    assert device_may(ME, device_topic(ME, Channel.COMMANDS), "subscribe") is True
    for flt in (f"{TOPIC_ROOT}/{ME}/#", f"{TOPIC_ROOT}/{ME}/+", f"{TOPIC_ROOT}/+/commands",
                f"$share/{ME}/{TOPIC_ROOT}/{ME}/commands"):
        assert device_may(ME, flt, "subscribe") is False, flt


def test_exported_from_the_package() -> None:
    assert exported_device_may is device_may
