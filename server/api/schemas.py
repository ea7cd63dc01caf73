"""Request/response bodies of the operator/engineer API (agent-facing ones live in protocol.api)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Path, Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from protocol.api import DeviceCredentials as DeviceCredentials  # re-exported: the API's name for it

T = TypeVar("T")

# The largest integers the database stores, so that a larger id or offset is refused with 422 by
# validation instead of overflowing in the driver (a 500): the id columns are INTEGER, 32-bit on
# PostgreSQL (64-bit on SQLite); OFFSET takes a BIGINT on both.
DB_ID_MAX = 2**31 - 1
SQL_INT_MAX = 2**63 - 1
# An integer key (model version, rollout, job, bootstrap token) in a request body ...
DbInt = Annotated[int, Field(ge=1, le=DB_ID_MAX)]
# ... in a path, and a list endpoint's page offset.
DbId = Annotated[int, Path(ge=1, le=DB_ID_MAX)]
Offset = Annotated[int, Query(ge=0, le=SQL_INT_MAX, description="matches to skip")]

LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
MAX_LABELS = 32


def _sorted_unique(values: list[str]) -> list[str]:
    return sorted(set(values))


Label = Annotated[str, Field(pattern=LABEL_PATTERN, description="1-64 of A-Z a-z 0-9 _ . : -")]
Labels = Annotated[list[Label], Field(max_length=MAX_LABELS), AfterValidator(_sorted_unique)]


class ErrorResponse(BaseModel):
    """Every 4xx/5xx the API raises itself: one human-readable reason."""

    detail: str = Field(description="why the request was refused")


class Page(BaseModel, Generic[T]):
    """One page of a list endpoint: ``items[offset:offset+limit]`` of ``total`` matches."""

    total: int
    limit: int
    offset: int
    items: list[T]


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    # None: a new device gets none, a re-keyed one keeps its own.
    groups: Labels | None = None
    tags: Labels | None = None


class DeviceBulkCredentials(BaseModel):
    """What a bulk provisioning call created: every device's credentials (shown once), in the
    order given; ``rekeyed`` of them existed and got new ones (their old ones stop working)."""

    total: int
    created: int
    rekeyed: int
    items: list[DeviceCredentials]


class DeviceUpdate(BaseModel):
    """Operator edit of a device's inventory labels; a field left out is left as it is."""

    model_config = ConfigDict(extra="forbid")
    groups: Labels | None = None
    tags: Labels | None = None


class DeviceInfo(BaseModel):
    """A device's inventory record: identity, labels, hardware, versions and live state."""

    id: str
    online: bool = Field(description="from the retained status (birth online, last will offline) and heartbeats")
    last_seen: datetime | None
    agent_version: str
    active_version: int | None
    candidate_version: int | None
    update_state: str
    hardware: dict[str, Any] = Field(description="cpu, cpu_count, gpu, gpu_compute_capability, tensorrt_version, "
                                                 "onnxruntime_providers (as the device reports them)")
    heartbeat: dict[str, Any] = Field(description="the last heartbeat: fps, latency, spool depth, disk ...")
    groups: list[str]
    tags: list[str]
    revoked: bool
    revoked_at: datetime | None
    enrolled_by: str
    enrolled_at: datetime | None
    created_at: datetime | None


class BootstrapTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: Labels = Field(default_factory=list, description="groups every device enrolled with it joins")
    tags: Labels = Field(default_factory=list, description="tags every device enrolled with it gets")
    max_uses: int = Field(1, ge=1, le=100_000, description="how many devices may enroll with it")
    expires_in_seconds: int = Field(24 * 3600, ge=60, le=366 * 24 * 3600)
    note: str = Field("", max_length=256)


class BootstrapTokenInfo(BaseModel):
    """A bootstrap token as listed: never its secret."""

    id: int
    created_by: str
    created_at: datetime
    expires_at: datetime
    max_uses: int
    uses: int
    groups: list[str]
    tags: list[str]
    note: str
    last_used_at: datetime | None
    revoked_at: datetime | None
    state: Literal["active", "expired", "exhausted", "revoked"]


class BootstrapTokenCreated(BootstrapTokenInfo):
    token: str = Field(description="the secret, shown only in this response")


class RetrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=3, max_length=2000)


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: DbInt | Literal["production"] = "production"
    devices: list[str] | None = None  # None: every enrolled device
    mode: Literal["shadow_then_switch", "direct"] = "shadow_then_switch"
    shadow_frames: int | None = Field(default=None, ge=1, le=1_000_000)


class RegistryActionRequest(BaseModel):
    """Approve, roll back or release: a person's reason goes into the audit log."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=2000)


class FleetRollbackRequest(RegistryActionRequest):
    """Roll the fleet back to ``version`` (omitted: the production version before the current one)."""

    version: DbId | None = None


class FleetRollbackResult(BaseModel):
    from_version: int | None = Field(description="production before the rollback")
    to_version: int = Field(description="production now")
    registry_moved: bool = Field(description="false when the version already was production")
    rollout_rolled_back: int | None = Field(description="the rollout in the way, rolled back (its devices revert)")
    commanded: list[str] = Field(description="devices sent a signed rollback command now")
    reverted_by_rollout: list[str] = Field(description="devices the rolled-back rollout takes back")
    left: list[str] = Field(description="devices busy in another rollout or reverting elsewhere first")
    offline: list[str] = Field(description="commanded devices that are offline (their broker session keeps it)")


class ResolveHaltRequest(BaseModel):
    """Drop a halted batch's rejects and continue: a person's reason goes into the audit log."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=3, max_length=2000, description="why the rejects may be dropped (audit log)")


class RejectedSample(BaseModel):
    sample_id: str
    device_id: str = Field(description="the device that collected it (empty if the sample row is gone)")
    reason: str = Field(description="why the data contract rejected it")
    status: str = Field(description="the sample's status now: validated (held by the halt), rejected (dropped), "
                                    "missing, ...")


class HaltResolution(BaseModel):
    by: str
    at: datetime
    reason: str
    dropped: int


class JobRejects(BaseModel):
    """The samples the data contract rejected in a job's batch, with the halt, if the batch halted."""

    job_id: int
    halted: bool = Field(description="the batch had too many rejects and halted the job")
    halt_reason: str
    resolved: HaltResolution | None = Field(description="who dropped the rejects and continued, when, why")
    total: int
    limit: int
    offset: int
    items: list[RejectedSample]


class HaltResolved(BaseModel):
    job_id: int = Field(description="the halted job")
    dropped: int = Field(description="rejected samples dropped (status rejected)")
    status: Literal["resolved"]
    next_job_id: int = Field(description="the retrain queued to continue on the rest of the batch")
    next_job_status: str
