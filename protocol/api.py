"""HTTP payloads exchanged between agents and the server (the MQTT side lives in messages.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.messages import DeviceId, Hardware

API_PREFIX = "/api/v1"
ENROLL_PATH = f"{API_PREFIX}/enroll"
MAX_SAMPLE_BYTES = 8 * 1024 * 1024


class UploadRequest(BaseModel):
    """An agent asks where to upload one collected frame."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0, le=MAX_SAMPLE_BYTES)
    content_type: Literal["image/jpeg", "image/png"] = "image/jpeg"


class UploadGrant(BaseModel):
    """A presigned PUT URL for exactly one object key."""

    object_key: str
    url: str
    expires_at: datetime
    headers: dict[str, str] = Field(default_factory=dict)


def upload_path(device_id: str) -> str:
    return f"{API_PREFIX}/devices/{device_id}/uploads"


class EnrollRequest(BaseModel):
    """A device exchanges a bootstrap token, once, for its own identity (no other auth)."""

    model_config = ConfigDict(extra="forbid")

    bootstrap_token: str = Field(min_length=8, max_length=256)
    device_id: DeviceId
    hardware: Hardware | None = None
    agent_version: str = Field(default="", max_length=32)


class DeviceCredentials(BaseModel):
    """A device's own identity, shown once: the agent keeps it in its credentials file (0600)."""

    device_id: str
    api_token: str
    mqtt_username: str
    mqtt_password: str


class EnrollResponse(DeviceCredentials):
    """Credentials plus what the bootstrap token assigned the device to."""

    groups: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
