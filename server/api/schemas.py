"""Request/response bodies of the operator/engineer API (agent-facing ones live in protocol.api)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")


class DeviceCredentials(BaseModel):
    device_id: str
    api_token: str
    mqtt_username: str
    mqtt_password: str


class RetrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=3, max_length=2000)


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | Literal["production"] = "production"
    devices: list[str] | None = None  # None: every enrolled device
    mode: Literal["shadow_then_switch", "direct"] = "shadow_then_switch"
    shadow_frames: int | None = Field(default=None, ge=1, le=1_000_000)


class RegistryActionRequest(BaseModel):
    """Approve, roll back or release: a person's reason goes into the audit log."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=2000)
