"""MQTT topic layout: one builder, one parser, and the QoS/retain of every channel.

Topic root: ``edgeloop/v1/devices/{device_id}/{channel}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

TOPIC_ROOT = "edgeloop/v1/devices"

# Device ids double as broker user names and object-key prefixes: keep them to a
# conservative alphabet so they can never inject MQTT wildcards or path segments.
_DEVICE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class Channel(StrEnum):
    STATUS = "status"
    HEARTBEAT = "heartbeat"
    SAMPLES = "samples"
    SHADOW = "shadow"
    UPDATE = "update"
    DRIFT = "drift"
    COMMANDS = "commands"


@dataclass(frozen=True)
class TopicSpec:
    channel: Channel
    qos: int
    retain: bool
    # "device" channels are published by the device, "server" ones by the server.
    publisher: str


_SPECS: dict[Channel, TopicSpec] = {
    Channel.STATUS: TopicSpec(Channel.STATUS, qos=1, retain=True, publisher="device"),
    Channel.HEARTBEAT: TopicSpec(Channel.HEARTBEAT, qos=0, retain=False, publisher="device"),
    Channel.SAMPLES: TopicSpec(Channel.SAMPLES, qos=1, retain=False, publisher="device"),
    Channel.SHADOW: TopicSpec(Channel.SHADOW, qos=1, retain=False, publisher="device"),
    Channel.UPDATE: TopicSpec(Channel.UPDATE, qos=1, retain=False, publisher="device"),
    Channel.DRIFT: TopicSpec(Channel.DRIFT, qos=1, retain=False, publisher="device"),
    Channel.COMMANDS: TopicSpec(Channel.COMMANDS, qos=1, retain=False, publisher="server"),
}


class TopicError(ValueError):
    """A topic or device id that does not follow the layout."""


def validate_device_id(device_id: str) -> str:
    # fullmatch: with match(), ``$`` also accepts a trailing newline ("dev1\n").
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise TopicError(
            f"invalid device id {device_id!r}: use 1-63 characters of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit"
        )
    return device_id


def topic_spec(channel: Channel | str) -> TopicSpec:
    return _SPECS[Channel(channel)]


def device_topic(device_id: str, channel: Channel | str) -> str:
    return f"{TOPIC_ROOT}/{validate_device_id(device_id)}/{Channel(channel).value}"


def parse_device_topic(topic: str) -> tuple[str, Channel]:
    prefix = TOPIC_ROOT + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} is outside {TOPIC_ROOT}/")
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 2:
        raise TopicError(f"topic {topic!r} is not {TOPIC_ROOT}/<device>/<channel>")
    device_id, channel = parts
    validate_device_id(device_id)
    try:
        return device_id, Channel(channel)
    except ValueError:
        raise TopicError(f"topic {topic!r} names unknown channel {channel!r}") from None


#: Channels whose messages of one device (and of one group) must reach one consumer, in order:
#: drift windows feed per-device hysteresis and per-group rounds. Replicas do not share them.
SINGLE_CONSUMER_CHANNELS = frozenset({Channel.DRIFT})


def shared_filter(group: str, topic_filter: str) -> str:
    """An MQTT v5 shared subscription: the broker hands each message to one subscriber of ``group``."""
    if not group or any(c in group for c in "/+#"):
        raise TopicError(f"invalid shared subscription group {group!r}")
    return f"$share/{group}/{topic_filter}"


def server_subscriptions(shared_group: str | None = None, *, primary: bool = True) -> list[tuple[str, int]]:
    """(filter, qos) pairs the server subscribes to: every device-published channel.

    With ``shared_group`` (replicas) the channels are shared across the group, except
    :data:`SINGLE_CONSUMER_CHANNELS`, which only the primary subscribes to, unshared."""
    subscriptions = []
    for spec in _SPECS.values():
        if spec.publisher != "device":
            continue
        topic_filter = f"{TOPIC_ROOT}/+/{spec.channel.value}"
        if shared_group is None:
            subscriptions.append((topic_filter, spec.qos))
        elif spec.channel in SINGLE_CONSUMER_CHANNELS:
            if primary:
                subscriptions.append((topic_filter, spec.qos))
        else:
            subscriptions.append((shared_filter(shared_group, topic_filter), spec.qos))
    return subscriptions


# The device ACL model, in one place: a device writes (publishes) the channels it publishes and
# reads (subscribes to) the ones the server publishes, on its own topics only. acl_patterns()
# writes it for Mosquitto; device_may() answers it for a broker that asks per operation (EMQX).
_DEVICE_ACCESS = {"device": "write", "server": "read"}  # TopicSpec.publisher -> the device's access
_ACCESS_ACTION = {"write": "publish", "read": "subscribe"}  # MQTT operation an access grants


def acl_patterns() -> list[str]:
    """Mosquitto ACL ``pattern`` lines for devices: each device writes only its own
    device channels and reads only its own commands. ``%u`` is the broker user name,
    which the broker also forces as client id (``use_username_as_clientid``)."""
    lines = []
    for spec in _SPECS.values():
        access = _DEVICE_ACCESS[spec.publisher]
        lines.append(f"pattern {access} {TOPIC_ROOT}/%u/{spec.channel.value}")
    return lines


def device_may(username: str, topic: str, action: str) -> bool:
    """Whether the device whose broker user name is ``username`` may ``action`` (``"publish"`` or
    ``"subscribe"``) ``topic``: the rules of :func:`acl_patterns` with ``%u`` = ``username``, for a
    broker that asks at each operation (EMQX's HTTP authorizer, server/api/broker_hooks.py).

    ``topic`` must be one of the device's own topics exactly: a subscription filter with a wildcard
    (``+``, ``#``), a shared subscription (``$share/...``) or any other ``$`` topic is refused, even
    where it would only match the device's own topics; so is a user name that is not a device id."""
    if not isinstance(topic, str) or any(c in topic for c in "+#\0"):
        return False
    try:
        validate_device_id(username)
    except TopicError:
        return False
    prefix = f"{TOPIC_ROOT}/{username}/"
    if not topic.startswith(prefix):
        return False
    try:
        spec = _SPECS[Channel(topic[len(prefix):])]
    except ValueError:
        return False
    return _ACCESS_ACTION[_DEVICE_ACCESS[spec.publisher]] == action
