"""Topic layout: builder/parser round trips, device-id validation, ACL patterns, server subscriptions."""

from __future__ import annotations

import pytest

from protocol.topics import (
    TOPIC_ROOT,
    Channel,
    TopicError,
    acl_patterns,
    device_topic,
    parse_device_topic,
    server_subscriptions,
    topic_spec,
    validate_device_id,
)

DEVICE_CHANNELS = [c for c in Channel if c is not Channel.COMMANDS]


@pytest.mark.parametrize("channel", list(Channel))
@pytest.mark.parametrize("device_id", ["line-1", "cam_07", "0", "a" * 63])
def test_build_then_parse_round_trips_for_every_channel(channel: Channel, device_id: str) -> None:
    topic = device_topic(device_id, channel)
    assert topic == f"{TOPIC_ROOT}/{device_id}/{channel.value}"
    parsed_device, parsed_channel = parse_device_topic(topic)
    assert parsed_device == device_id
    assert parsed_channel is channel


def test_device_topic_accepts_channel_as_string() -> None:
    assert device_topic("dev1", "samples") == device_topic("dev1", Channel.SAMPLES)


def test_device_topic_rejects_unknown_channel() -> None:
    with pytest.raises(ValueError):
        device_topic("dev1", "firmware")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "+",
        "#",
        "dev+1",
        "dev#",
        "dev/1",
        "../dev",
        "Dev1",
        "DEVICE",
        "a" * 64,
        "-dev",
        "_dev",
        "dev 1",
        "dev.1",
        "dev1\n",  # re.match with ``$`` used to accept a trailing newline
        "dév",
    ],
)
def test_bad_device_ids_are_rejected(bad: str) -> None:
    with pytest.raises(TopicError, match="invalid device id"):
        validate_device_id(bad)
    with pytest.raises(TopicError):
        device_topic(bad, Channel.STATUS)


@pytest.mark.parametrize("bad", [None, 12, b"dev1"])
def test_non_string_device_ids_are_rejected(bad: object) -> None:
    with pytest.raises(TopicError):
        validate_device_id(bad)  # type: ignore[arg-type]


def test_longest_allowed_device_id_is_63_characters() -> None:
    assert validate_device_id("a" * 63) == "a" * 63


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/devices/dev1/status",
        "edgeloop/v2/devices/dev1/status",
        f"{TOPIC_ROOT}/dev1",
        f"{TOPIC_ROOT}/dev1/status/extra",
        f"{TOPIC_ROOT}/dev1/",
        f"{TOPIC_ROOT}//status",
        f"{TOPIC_ROOT}/+/status",
        f"{TOPIC_ROOT}/#",
        f"{TOPIC_ROOT}/Dev1/status",
        f"{TOPIC_ROOT}/dev1/firmware",
        f"{TOPIC_ROOT}/dev1/STATUS",
        f"{TOPIC_ROOT}/dev1\n/status",
        "",
    ],
)
def test_parse_rejects_malformed_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_device_topic(topic)


def test_unknown_channel_error_names_the_channel() -> None:
    with pytest.raises(TopicError, match="firmware"):
        parse_device_topic(f"{TOPIC_ROOT}/dev1/firmware")


def test_acl_gives_devices_write_on_device_channels_and_read_on_commands_only() -> None:
    lines = acl_patterns()
    assert len(lines) == len(Channel) == len(set(lines))
    expected = {f"pattern write {TOPIC_ROOT}/%u/{c.value}" for c in DEVICE_CHANNELS}
    expected.add(f"pattern read {TOPIC_ROOT}/%u/commands")
    assert set(lines) == expected
    # Never a readwrite grant, never a wildcard that would reach other devices.
    for line in lines:
        access = line.split()[1]
        assert access in {"read", "write"}
        assert "+" not in line and "#" not in line
    reads = [line for line in lines if line.split()[1] == "read"]
    assert reads == [f"pattern read {TOPIC_ROOT}/%u/commands"]


def test_server_subscribes_to_exactly_the_device_published_channels_with_their_qos() -> None:
    subs = server_subscriptions()
    assert len(subs) == len(DEVICE_CHANNELS)
    expected = {(f"{TOPIC_ROOT}/+/{c.value}", topic_spec(c).qos) for c in DEVICE_CHANNELS}
    assert set(subs) == expected
    assert all(not flt.endswith("/commands") for flt, _ in subs)
    assert dict(subs)[f"{TOPIC_ROOT}/+/heartbeat"] == 0
    assert dict(subs)[f"{TOPIC_ROOT}/+/samples"] == 1


def test_topic_spec_lookup_by_enum_or_string() -> None:
    for c in Channel:
        assert topic_spec(c).channel is c
        assert topic_spec(c.value) is topic_spec(c)
    with pytest.raises(ValueError):
        topic_spec("firmware")


def test_replicas_share_every_channel_but_drift_which_only_the_primary_takes() -> None:
    from protocol.topics import SINGLE_CONSUMER_CHANNELS

    plain = dict(server_subscriptions())
    primary = dict(server_subscriptions("edgeloop", primary=True))
    ingest = dict(server_subscriptions("edgeloop", primary=False))
    drift = f"{TOPIC_ROOT}/+/drift"
    assert {Channel.DRIFT} == SINGLE_CONSUMER_CHANNELS
    assert primary[drift] == plain[drift] and drift not in ingest
    shared = {f"$share/edgeloop/{flt}": qos for flt, qos in plain.items() if flt != drift}
    assert {k: v for k, v in primary.items() if k != drift} == shared
    assert ingest == shared


@pytest.mark.parametrize("group", ["", "a/b", "a+", "#"])
def test_a_shared_group_name_cannot_change_the_filter(group) -> None:
    with pytest.raises(ValueError):
        server_subscriptions(group)
