"""Heartbeat spool fields: reported counters round-trip, older payloads without them still parse,
and the per-reason counters are bounded and non-negative."""

from __future__ import annotations

import json

import pytest

from protocol.messages import Heartbeat, ProtocolError, decode_message, encode_message
from protocol.topics import Channel, device_topic

DEV = "line-7"
TOPIC = device_topic(DEV, Channel.HEARTBEAT)
BASE = {"fps": 10.0, "latency_ms_p50": 3.0, "latency_ms_p99": 7.0, "frames_total": 100, "samples_sent": 5,
        "spool_depth": 2, "disk_free_bytes": 10**9}


def test_spool_counters_round_trip() -> None:
    beat = Heartbeat(device_id=DEV, **BASE, spool_bytes=123_456, spool_evicted=4, spool_dropped=1,
                     samples={"collected": {"correction": 9, "random": 3}, "evicted": {"random": 4},
                              "dropped": {"correction": 1}})
    decoded = decode_message(TOPIC, encode_message(beat))
    assert decoded == beat
    assert decoded.samples["evicted"] == {"random": 4}
    assert decoded.spool_bytes == 123_456


def test_heartbeat_from_an_older_agent_without_spool_fields_parses_with_zero_defaults() -> None:
    payload = json.dumps({"v": 1, "type": "heartbeat", "device_id": DEV, **BASE}).encode()
    beat = decode_message(TOPIC, payload)
    assert isinstance(beat, Heartbeat)
    assert (beat.spool_bytes, beat.spool_evicted, beat.spool_dropped, beat.samples) == (0, 0, 0, {})


@pytest.mark.parametrize("samples", [
    {"collected": {"correction": -1}},                       # counters never go negative
    {"collected": {"": 1}},                                  # reasons have a name
    {"x" * 65: {"random": 1}},                               # names are bounded
    {f"event{i}": {"random": 1} for i in range(17)},         # so is the number of counters
    {"collected": {f"reason{i}": 1 for i in range(33)}},     # and of reasons per counter
])
def test_bad_per_reason_counters_are_refused(samples) -> None:
    payload = json.dumps({"v": 1, "type": "heartbeat", "device_id": DEV, **BASE, "samples": samples}).encode()
    with pytest.raises(ProtocolError, match="samples"):
        decode_message(TOPIC, payload)


def test_negative_spool_totals_are_refused() -> None:
    payload = json.dumps({"v": 1, "type": "heartbeat", "device_id": DEV, **BASE, "spool_evicted": -2}).encode()
    with pytest.raises(ProtocolError, match="spool_evicted"):
        decode_message(TOPIC, payload)
