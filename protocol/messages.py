"""Versioned message schemas for every MQTT channel, discriminated on ``type``.

Every message carries ``v`` (schema version) and ``type``. ``decode_message`` checks
the payload size, the JSON, the schema, and that the type belongs to the topic's channel.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from protocol.topics import Channel, TopicError, parse_device_topic, validate_device_id

PROTOCOL_VERSION = 1
# Brokers and the server refuse anything larger: a sample event carries metadata,
# never image bytes (those go to the object store through a presigned URL).
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_BOXES = 300


class ProtocolError(ValueError):
    """A payload that is not a valid edgeloop message for its topic."""


def _checked_device_id(value: str) -> str:
    try:
        return validate_device_id(value)
    except TopicError as exc:
        raise ValueError(str(exc)) from None


#: A device id as the topic layout allows it (protocol.topics.validate_device_id).
DeviceId = Annotated[str, AfterValidator(_checked_device_id)]


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = PROTOCOL_VERSION
    device_id: DeviceId
    ts: datetime = Field(default_factory=_now)
    msg_id: str = Field(default_factory=_new_id, min_length=8, max_length=64)


class Box(BaseModel):
    """One box in YOLO convention: class id and normalised centre/size in [0, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cls: int = Field(ge=0, le=10_000)
    cx: float
    cy: float
    w: float
    h: float
    conf: float | None = Field(default=None, ge=0.0, le=1.0)

    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.cx - self.w / 2, self.cy - self.h / 2, self.cx + self.w / 2, self.cy + self.h / 2)


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: str = ""
    cpu_count: int = 0
    gpu: str | None = None
    gpu_compute_capability: str | None = None
    tensorrt_version: str | None = None
    onnxruntime_providers: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- device → server


class StatusMessage(_Message):
    """Retained; the broker publishes the ``offline`` variant as the device's last will."""

    type: Literal["status"] = "status"
    state: Literal["online", "offline"]
    agent_version: str = ""
    active_version: int | None = None
    candidate_version: int | None = None
    hardware: Hardware | None = None


_Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]
_ReasonCounts = Annotated[dict[_Name, NonNegativeInt], Field(max_length=32)]


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    fps: float = Field(ge=0)
    latency_ms_p50: float = Field(ge=0)
    latency_ms_p99: float = Field(ge=0)
    frames_total: int = Field(ge=0)
    samples_sent: int = Field(ge=0)
    spool_depth: int = Field(ge=0)
    disk_free_bytes: int = Field(ge=0)
    active_version: int | None = None
    candidate_version: int | None = None
    # Spool totals since the device's spool was created; the defaults keep older agents' heartbeats valid.
    spool_bytes: int = Field(default=0, ge=0)
    spool_evicted: int = Field(default=0, ge=0)
    spool_dropped: int = Field(default=0, ge=0)
    # Per sample reason, e.g. {"collected": {"correction": 12}, "sent": {...}, "evicted": {"random": 3}}.
    samples: dict[_Name, _ReasonCounts] = Field(default_factory=dict, max_length=16)


class SampleReason(StrEnum):
    CORRECTION = "correction"
    LOW_CONFIDENCE = "low_confidence"
    SHADOW_DISAGREEMENT = "shadow_disagreement"
    RANDOM = "random"


class SampleEvent(_Message):
    """A collected frame, already uploaded to ``object_key``; ``sample_id`` is the idempotency key."""

    type: Literal["sample"] = "sample"
    sample_id: str = Field(min_length=8, max_length=64, pattern=r"^[0-9a-f]+$")
    object_key: str = Field(min_length=1, max_length=512)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)
    content_type: Literal["image/jpeg", "image/png"] = "image/jpeg"
    width: int = Field(gt=0, le=16384)
    height: int = Field(gt=0, le=16384)
    reason: SampleReason
    model_version: int | None = None
    frame_id: str = Field(default="", max_length=128)
    captured_at: datetime = Field(default_factory=_now)
    predictions: list[Box] = Field(default_factory=list, max_length=MAX_BOXES)
    # Corrected ground truth (operator/QA); None means unlabeled.
    labels: list[Box] | None = Field(default=None, max_length=MAX_BOXES)


class ShadowReport(_Message):
    type: Literal["shadow"] = "shadow"
    update_id: str
    active_version: int | None
    candidate_version: int
    window: int = Field(ge=0)
    frames_compared: int = Field(ge=0)
    frames_dropped: int = Field(ge=0)
    agreement: float | None = Field(default=None, ge=0, le=1)
    # Share of the active model's confident boxes the candidate also found (same class, IoU >= 0.5):
    # agreement where the active model is confident, what a rollout gates on (new detections of a
    # retrained model are judged on corrected frames instead). None: no such box in the window, or
    # an agent that does not measure it.
    confident_agreement: float | None = Field(default=None, ge=0, le=1)
    corrected_frames: int = Field(default=0, ge=0)
    active_accuracy: float | None = Field(default=None, ge=0, le=1)
    candidate_accuracy: float | None = Field(default=None, ge=0, le=1)
    # Paired outcomes on the corrected frames (what a rollout's accuracy decision counts): frames only
    # the candidate got right, and frames only the active model got right. None from older agents.
    candidate_only_correct: int | None = Field(default=None, ge=0)
    active_only_correct: int | None = Field(default=None, ge=0)
    active_latency_ms_p50: float | None = None
    active_latency_ms_p99: float | None = None
    candidate_latency_ms_p50: float | None = None
    candidate_latency_ms_p99: float | None = None
    errors: int = Field(default=0, ge=0)
    # Frames the shadow budget (max share of device time) kept from the candidate; 0 from older agents.
    frames_skipped_budget: int = Field(default=0, ge=0)


class EngineBuildEvent(_Message):
    """A TensorRT engine the device builds from a bundle's ONNX because no engine in the bundle
    matched its GPU and TensorRT version. One build (one ``build_id``) reports ``started``, then
    throttled ``progress``, then ``succeeded`` or ``failed``; ``cached`` says an engine built
    earlier for the same ONNX, GPU, TensorRT version and precision was reused."""

    type: Literal["engine_build"] = "engine_build"
    build_id: str = Field(min_length=8, max_length=64)
    model_version: int | None = Field(default=None, ge=1)
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    gpu_compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    tensorrt_version: str = Field(min_length=1, max_length=32)
    precision: Literal["fp32", "fp16"]
    outcome: Literal["started", "progress", "succeeded", "failed", "cached"]
    phase: str = Field(default="", max_length=200)
    percent: float = Field(default=0.0, ge=0, le=100)
    duration_s: float = Field(default=0.0, ge=0)
    engine_bytes: int | None = Field(default=None, ge=0)
    reason: str = Field(default="", max_length=2000)


class UpdateEvent(_Message):
    """One transition of the device's OTA state machine."""

    type: Literal["update"] = "update"
    update_id: str
    version: int
    from_state: str
    to_state: str
    event: str
    reason: str = Field(default="", max_length=2000)
    active_version: int | None = None


class Histogram(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    edges: list[float] = Field(min_length=2, max_length=257)
    counts: list[int] = Field(min_length=1, max_length=256)


class DriftReport(_Message):
    type: Literal["drift"] = "drift"
    model_version: int | None = None
    window: int = Field(ge=0)
    frames: int = Field(ge=0)
    histograms: dict[str, Histogram] = Field(default_factory=dict, max_length=64)
    correction_rate: float | None = Field(default=None, ge=0, le=1)
    # Frames the line's QA judged in this window (what correction_rate is a share of) and when the
    # window opened; the defaults keep older agents' reports valid.
    qa_frames: int = Field(default=0, ge=0)
    started_at: datetime | None = None


# ---------------------------------------------------------------- server → device


class _Command(_Message):
    command_id: str = Field(default_factory=_new_id, min_length=8, max_length=64)


class DeployCommand(_Command):
    """Fetch, verify and install bundle ``version``; ``mode`` says whether it shadows first."""

    type: Literal["deploy"] = "deploy"
    version: int = Field(ge=1)
    bundle_url: str = Field(min_length=1, max_length=4096)
    bundle_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bundle_size: int = Field(gt=0)
    mode: Literal["shadow_then_switch", "direct"] = "shadow_then_switch"
    shadow_frames: int = Field(default=50, ge=1, le=1_000_000)
    rollout_id: str | None = None
    # A rollout's gates are the server's decision: with this set the agent, once its shadow window
    # passes its own checks, stays in SHADOWING, reporting a window every ``shadow_frames`` frames,
    # until a PromoteCommand or AbortCommand arrives. False: it promotes itself (plain deploys).
    await_promotion: bool = False


class PromoteCommand(_Command):
    type: Literal["promote"] = "promote"
    version: int = Field(ge=1)


class RollbackCommand(_Command):
    """Switch back to ``to_version`` (None: the newest older version the device holds).

    The one way past a device's rollback protection, so devices act only on a command signed
    with a bundle key (``firmware_bundles.commands``): ``signature`` is hex ed25519 over the
    canonical JSON of every other field. The bundle fields let a device that no longer holds
    the version fetch it; ``expires_at`` bounds replays.
    """

    type: Literal["rollback"] = "rollback"
    to_version: int | None = Field(default=None, ge=1)
    reason: str = Field(default="", max_length=2000)
    bundle_url: str | None = Field(default=None, min_length=1, max_length=4096)
    bundle_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    bundle_size: int | None = Field(default=None, gt=0, validate_default=True)
    expires_at: datetime | None = None
    key_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")

    @field_validator("bundle_size")
    @classmethod
    def _bundle_is_complete(cls, value: int | None, info) -> int | None:
        given = [info.data.get("bundle_url"), info.data.get("bundle_sha256"), value]
        if any(v is not None for v in given):
            if not all(v is not None for v in given):
                raise ValueError("bundle_url, bundle_sha256 and bundle_size go together")
            if info.data.get("to_version") is None:
                raise ValueError("a rollback bundle needs to_version")
        return value


class AbortCommand(_Command):
    type: Literal["abort"] = "abort"
    version: int = Field(ge=1)
    reason: str = Field(default="", max_length=2000)


class SamplingConfigCommand(_Command):
    type: Literal["sampling_config"] = "sampling_config"
    random_rate: float | None = Field(default=None, ge=0, le=1)
    low_confidence_band: tuple[float, float] | None = None
    max_samples_per_hour: int | None = Field(default=None, ge=0)


DeviceMessage = Annotated[
    StatusMessage | Heartbeat | SampleEvent | ShadowReport | UpdateEvent | EngineBuildEvent | DriftReport,
    Field(discriminator="type"),
]
Command = Annotated[
    DeployCommand | PromoteCommand | RollbackCommand | AbortCommand | SamplingConfigCommand,
    Field(discriminator="type"),
]

_DEVICE_ADAPTER: TypeAdapter = TypeAdapter(DeviceMessage)
_COMMAND_ADAPTER: TypeAdapter = TypeAdapter(Command)

# Which message types may travel on which channel.
_CHANNEL_TYPES: dict[Channel, tuple[type[BaseModel], ...]] = {
    Channel.STATUS: (StatusMessage,),
    Channel.HEARTBEAT: (Heartbeat,),
    Channel.SAMPLES: (SampleEvent,),
    Channel.SHADOW: (ShadowReport,),
    Channel.UPDATE: (UpdateEvent, EngineBuildEvent),
    Channel.DRIFT: (DriftReport,),
    Channel.COMMANDS: (DeployCommand, PromoteCommand, RollbackCommand, AbortCommand, SamplingConfigCommand),
}


def channel_of(message: BaseModel) -> Channel:
    for channel, types in _CHANNEL_TYPES.items():
        if isinstance(message, types):
            return channel
    raise ProtocolError(f"{type(message).__name__} belongs to no channel")


def encode_message(message: BaseModel) -> bytes:
    data = message.model_dump_json(exclude_none=False).encode()
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"message is {len(data)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")
    return data


def decode_message(topic: str, payload: bytes):
    """Parse ``payload`` received on ``topic``; the device id in the topic must match the payload's."""
    try:
        device_id, channel = parse_device_topic(topic)
    except TopicError as exc:
        raise ProtocolError(str(exc)) from None
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload is {len(payload)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")
    adapter = _COMMAND_ADAPTER if channel is Channel.COMMANDS else _DEVICE_ADAPTER
    try:
        message = adapter.validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        raise ProtocolError(f"invalid {channel.value} message: {where}: {first.get('msg')}") from None
    if not isinstance(message, _CHANNEL_TYPES[channel]):
        raise ProtocolError(f"a {message.type!r} message does not belong on the {channel.value} channel")
    if message.device_id != device_id:
        raise ProtocolError(
            f"payload device_id {message.device_id!r} does not match topic device {device_id!r}"
        )
    return message
