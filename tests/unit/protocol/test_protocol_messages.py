"""Message schemas: encode/decode round trips and every way decode_message must refuse a payload."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from protocol.messages import (
    MAX_PAYLOAD_BYTES,
    AbortCommand,
    Box,
    DeployCommand,
    DriftReport,
    Heartbeat,
    Histogram,
    PromoteCommand,
    ProtocolError,
    RollbackCommand,
    SampleEvent,
    SampleReason,
    SamplingConfigCommand,
    ShadowReport,
    StatusMessage,
    UpdateEvent,
    channel_of,
    decode_message,
    encode_message,
)
from protocol.topics import Channel, device_topic

DEV = "line-3"
SHA = "ab" * 32


def _messages() -> list:
    ts = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    return [
        StatusMessage(device_id=DEV, ts=ts, state="online", agent_version="0.1.0", active_version=3),
        StatusMessage(device_id=DEV, state="offline"),
        Heartbeat(device_id=DEV, fps=29.5, latency_ms_p50=4.0, latency_ms_p99=9.5, frames_total=1000,
                  samples_sent=3, spool_depth=2, disk_free_bytes=10**9, active_version=3, candidate_version=4),
        SampleEvent(device_id=DEV, sample_id="0123456789abcdef", object_key=f"images/{DEV}/x.jpg", sha256=SHA,
                    size_bytes=1234, width=640, height=480, reason=SampleReason.CORRECTION, model_version=3,
                    frame_id="f1", predictions=[Box(cls=1, cx=0.5, cy=0.5, w=0.2, h=0.1, conf=0.7)],
                    labels=[Box(cls=0, cx=0.4, cy=0.4, w=0.1, h=0.1)]),
        ShadowReport(device_id=DEV, update_id="u1", active_version=3, candidate_version=4, window=50,
                     frames_compared=50, frames_dropped=1, agreement=0.97, active_latency_ms_p50=4.2),
        UpdateEvent(device_id=DEV, update_id="u1", version=4, from_state="STAGED", to_state="SHADOWING",
                    event="start_shadow"),
        DriftReport(device_id=DEV, window=100, frames=100,
                    histograms={"brightness": Histogram(edges=[0.0, 0.5, 1.0], counts=[40, 60])},
                    correction_rate=0.1),
        DeployCommand(device_id=DEV, version=4, bundle_url="https://s3/bundles/4.tar", bundle_sha256=SHA,
                      bundle_size=100, rollout_id="r1"),
        PromoteCommand(device_id=DEV, version=4),
        RollbackCommand(device_id=DEV, to_version=3, reason="gate failed"),
        AbortCommand(device_id=DEV, version=4, reason="operator"),
        SamplingConfigCommand(device_id=DEV, random_rate=0.01, low_confidence_band=(0.2, 0.5),
                              max_samples_per_hour=100),
    ]


def _topic(message, device_id: str = DEV) -> str:
    return device_topic(device_id, channel_of(message))


@pytest.mark.parametrize("message", _messages(), ids=lambda m: m.type)
def test_every_message_type_round_trips(message) -> None:
    payload = encode_message(message)
    decoded = decode_message(_topic(message), payload)
    assert type(decoded) is type(message)
    assert decoded == message
    assert json.loads(payload)["v"] == 1
    assert json.loads(payload)["type"] == message.type


def test_every_channel_has_a_message_type_in_the_examples() -> None:
    assert {channel_of(m) for m in _messages()} == set(Channel)


def test_channel_of_maps_types_to_their_channels() -> None:
    msgs = {m.type: m for m in _messages()}
    assert channel_of(msgs["sample"]) is Channel.SAMPLES
    assert channel_of(msgs["heartbeat"]) is Channel.HEARTBEAT
    assert channel_of(msgs["deploy"]) is Channel.COMMANDS
    with pytest.raises(ProtocolError):
        channel_of(Box(cls=0, cx=0.5, cy=0.5, w=0.1, h=0.1))


@pytest.mark.parametrize("message", _messages(), ids=lambda m: m.type)
def test_message_on_the_wrong_channel_is_refused(message) -> None:
    own = channel_of(message)
    payload = encode_message(message)
    for channel in Channel:
        if channel is own:
            continue
        with pytest.raises(ProtocolError):
            decode_message(device_topic(DEV, channel), payload)


def test_wrong_channel_error_names_type_and_channel() -> None:
    status = StatusMessage(device_id=DEV, state="online")
    with pytest.raises(ProtocolError, match=r"'status'.*heartbeat"):
        decode_message(device_topic(DEV, Channel.HEARTBEAT), encode_message(status))


def test_device_id_mismatch_between_topic_and_payload_is_refused() -> None:
    hb = _messages()[2]
    with pytest.raises(ProtocolError, match="does not match"):
        decode_message(device_topic("other-device", Channel.HEARTBEAT), encode_message(hb))


def test_command_for_another_device_is_refused() -> None:
    cmd = PromoteCommand(device_id="dev-a", version=2)
    with pytest.raises(ProtocolError, match="does not match"):
        decode_message(device_topic("dev-b", Channel.COMMANDS), encode_message(cmd))


def test_malformed_topic_becomes_protocol_error() -> None:
    hb = _messages()[2]
    with pytest.raises(ProtocolError):
        decode_message("edgeloop/v1/devices/+/heartbeat", encode_message(hb))
    with pytest.raises(ProtocolError):
        decode_message("somewhere/else", encode_message(hb))


def test_oversize_payload_is_refused_before_parsing() -> None:
    hb = json.loads(encode_message(_messages()[2]))
    raw = json.dumps(hb).encode()
    padded = raw[:-1] + b" " * (MAX_PAYLOAD_BYTES - len(raw) + 1) + b"}"
    assert len(padded) == MAX_PAYLOAD_BYTES + 1
    with pytest.raises(ProtocolError, match="limit"):
        decode_message(device_topic(DEV, Channel.HEARTBEAT), padded)
    # Exactly at the limit is still fine (the whitespace is valid JSON).
    at_limit = raw[:-1] + b" " * (MAX_PAYLOAD_BYTES - len(raw)) + b"}"
    assert len(at_limit) == MAX_PAYLOAD_BYTES
    assert isinstance(decode_message(device_topic(DEV, Channel.HEARTBEAT), at_limit), Heartbeat)


def test_encode_refuses_oversize_message() -> None:
    big = UpdateEvent(device_id=DEV, update_id="u" * (MAX_PAYLOAD_BYTES + 10), version=1,
                      from_state="IDLE", to_state="DOWNLOADING", event="deploy")
    with pytest.raises(ProtocolError, match="limit"):
        encode_message(big)


@pytest.mark.parametrize("payload", [b"", b"{", b"not json", b"\xff\xfe\x00", b"[1, 2]", b"null", b"42"])
def test_bad_json_is_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(device_topic(DEV, Channel.HEARTBEAT), payload)


def _hb_dict() -> dict:
    return json.loads(encode_message(_messages()[2]))


@pytest.mark.parametrize("type_", ["firmware", "", None, "deploy", "Heartbeat"])
def test_unknown_type_is_refused(type_) -> None:
    data = _hb_dict()
    data["type"] = type_
    with pytest.raises(ProtocolError):
        decode_message(device_topic(DEV, Channel.HEARTBEAT), json.dumps(data).encode())


def test_missing_type_is_refused() -> None:
    data = _hb_dict()
    del data["type"]
    with pytest.raises(ProtocolError):
        decode_message(device_topic(DEV, Channel.HEARTBEAT), json.dumps(data).encode())


@pytest.mark.parametrize("v", [0, 2, "1", None])
def test_wrong_schema_version_is_refused(v) -> None:
    data = _hb_dict()
    data["v"] = v
    with pytest.raises(ProtocolError, match=r"heartbeat\.v: "):
        decode_message(device_topic(DEV, Channel.HEARTBEAT), json.dumps(data).encode())


def test_missing_version_defaults_to_current() -> None:
    data = _hb_dict()
    del data["v"]
    assert decode_message(device_topic(DEV, Channel.HEARTBEAT), json.dumps(data).encode()).v == 1


def test_extra_fields_are_refused_on_messages_and_nested_boxes() -> None:
    data = _hb_dict()
    data["surprise"] = 1
    with pytest.raises(ProtocolError, match="surprise"):
        decode_message(device_topic(DEV, Channel.HEARTBEAT), json.dumps(data).encode())

    sample = json.loads(encode_message(_messages()[3]))
    sample["labels"][0]["colour"] = "red"
    with pytest.raises(ProtocolError):
        decode_message(device_topic(DEV, Channel.SAMPLES), json.dumps(sample).encode())


def test_invalid_device_id_in_payload_is_refused() -> None:
    data = _hb_dict()
    data["device_id"] = "Bad/ID"
    with pytest.raises(ProtocolError):
        decode_message(device_topic(DEV, Channel.HEARTBEAT), json.dumps(data).encode())
    with pytest.raises(ValidationError):
        StatusMessage(device_id="+", state="online")


@pytest.mark.parametrize(
    "field,value",
    [("sha256", "AB" * 32), ("sha256", "ab" * 31), ("sample_id", "XYZ12345"), ("sample_id", "abc"),
     ("size_bytes", 0), ("width", 0), ("height", 16385), ("reason", "boredom"),
     ("content_type", "image/gif"), ("object_key", "")],
)
def test_sample_event_field_constraints(field: str, value) -> None:
    data = json.loads(encode_message(_messages()[3]))
    data[field] = value
    with pytest.raises(ProtocolError):
        decode_message(device_topic(DEV, Channel.SAMPLES), json.dumps(data).encode())


def test_sample_event_refuses_too_many_boxes() -> None:
    data = json.loads(encode_message(_messages()[3]))
    data["predictions"] = [{"cls": 0, "cx": 0.5, "cy": 0.5, "w": 0.1, "h": 0.1}] * 301
    with pytest.raises(ProtocolError):
        decode_message(device_topic(DEV, Channel.SAMPLES), json.dumps(data).encode())


def test_deploy_command_constraints() -> None:
    with pytest.raises(ValidationError):
        DeployCommand(device_id=DEV, version=0, bundle_url="u", bundle_sha256=SHA, bundle_size=1)
    with pytest.raises(ValidationError):
        DeployCommand(device_id=DEV, version=1, bundle_url="u", bundle_sha256=SHA, bundle_size=1, mode="yolo")
    cmd = DeployCommand(device_id=DEV, version=1, bundle_url="u", bundle_sha256=SHA, bundle_size=1)
    assert cmd.mode == "shadow_then_switch" and cmd.shadow_frames == 50
    assert cmd.command_id != DeployCommand(
        device_id=DEV, version=1, bundle_url="u", bundle_sha256=SHA, bundle_size=1
    ).command_id


def test_messages_are_frozen() -> None:
    hb = _messages()[2]
    with pytest.raises(ValidationError):
        hb.fps = 1.0


def test_box_xyxy() -> None:
    box = Box(cls=2, cx=0.5, cy=0.4, w=0.2, h=0.1)
    assert box.xyxy() == pytest.approx((0.4, 0.35, 0.6, 0.45))
    corner = Box(cls=0, cx=0.05, cy=0.95, w=0.1, h=0.1)
    assert corner.xyxy() == pytest.approx((0.0, 0.9, 0.1, 1.0))


@pytest.mark.parametrize("bad", [{"cls": -1}, {"cls": 10_001}, {"conf": 1.5}, {"conf": -0.1}])
def test_box_constraints(bad: dict) -> None:
    fields = {"cls": 0, "cx": 0.5, "cy": 0.5, "w": 0.1, "h": 0.1, **bad}
    with pytest.raises(ValidationError):
        Box(**fields)
