"""HTTP payloads exchanged between agents and the server (the MQTT side lives in messages.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

API_PREFIX = "/api/v1"
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
