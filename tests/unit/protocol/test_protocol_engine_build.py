"""EngineBuildEvent on the update channel, and ShadowReport's budget counter staying optional."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from protocol.messages import (
    EngineBuildEvent,
    ProtocolError,
    ShadowReport,
    UpdateEvent,
    channel_of,
    decode_message,
    encode_message,
)
from protocol.topics import Channel, device_topic, topic_spec

DEV = "line-3"
SHA = "cd" * 32


def _event(**overrides) -> EngineBuildEvent:
    fields = dict(device_id=DEV, build_id="b" * 16, model_version=4, onnx_sha256=SHA,
                  gpu_compute_capability="8.7", tensorrt_version="10.3.0.26", precision="fp16",
                  outcome="progress", phase="Building engine", percent=42.5, duration_s=12.0)
    fields.update(overrides)
    return EngineBuildEvent(**fields)


def test_engine_build_event_travels_on_the_update_channel() -> None:
    event = _event()
    assert channel_of(event) is Channel.UPDATE
    assert topic_spec(Channel.UPDATE).qos == 1
    decoded = decode_message(device_topic(DEV, Channel.UPDATE), encode_message(event))
    assert decoded == event and isinstance(decoded, EngineBuildEvent)


def test_update_channel_still_carries_state_transitions() -> None:
    event = UpdateEvent(device_id=DEV, update_id="u1", version=4, from_state="STAGED", to_state="SHADOWING",
                        event="start_shadow")
    assert isinstance(decode_message(device_topic(DEV, Channel.UPDATE), encode_message(event)), UpdateEvent)


def test_engine_build_event_refused_on_another_channel() -> None:
    with pytest.raises(ProtocolError, match="does not belong on the shadow channel"):
        decode_message(device_topic(DEV, Channel.SHADOW), encode_message(_event()))


@pytest.mark.parametrize("overrides", [
    {"percent": 101.0}, {"percent": -1.0}, {"duration_s": -0.1}, {"onnx_sha256": "xyz"},
    {"gpu_compute_capability": "sm_87"}, {"precision": "int8"}, {"outcome": "done"}, {"build_id": "short"},
])
def test_engine_build_event_validates_fields(overrides) -> None:
    with pytest.raises(ValidationError):
        _event(**overrides)


def test_shadow_report_budget_skips_default_to_zero_for_old_payloads() -> None:
    report = ShadowReport(device_id=DEV, update_id="u1", active_version=3, candidate_version=4, window=50,
                          frames_compared=50, frames_dropped=1, frames_skipped_budget=7)
    topic = device_topic(DEV, Channel.SHADOW)
    assert decode_message(topic, encode_message(report)).frames_skipped_budget == 7
    old = json.loads(encode_message(report))
    del old["frames_skipped_budget"]  # an agent from before the shadow budget
    assert decode_message(topic, json.dumps(old).encode()).frames_skipped_budget == 0
    with pytest.raises(ValidationError):
        ShadowReport(device_id=DEV, update_id="u1", active_version=3, candidate_version=4, window=50,
                     frames_compared=50, frames_dropped=0, frames_skipped_budget=-1)
