"""What a rollout is asked to do: version, selector, waves, gates, mode and failure policy.

Pure pydantic shapes shared by the API, the CLI, the settings (``RolloutPolicy``) and the
controller. Percent waves are cumulative shares of the selected fleet; count waves add that many
devices (a canary is ``{"name": "canary", "count": 1}``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.schemas import Labels
from server.rollouts.sequential import Rule

Mode = Literal["shadow_then_switch", "direct"]
OnFailure = Literal["pause", "abort"]
RolloutState = Literal["pending", "awaiting_approval", "running", "paused", "succeeded", "aborted", "rolled_back"]
DeviceId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class Selector(BaseModel):
    """Which devices the rollout targets: every given field must match (empty = any)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: Labels = Field(default_factory=list, description="in ANY of these groups")
    tags: Labels = Field(default_factory=list, description="carrying ALL of these tags")
    devices: list[DeviceId] = Field(default_factory=list, max_length=10_000, description="only these devices")
    gpu_compute_capability: str | None = Field(None, max_length=16, description="exact, e.g. 8.7")
    tensorrt_version: str | None = Field(None, max_length=32, description="exact, e.g. 10.3.0")


class WaveSpec(BaseModel):
    """One wave: ``percent`` (cumulative share of the selected fleet reached by the end of this
    wave) or ``count`` (devices this wave adds), exactly one of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    percent: float | None = Field(None, gt=0, le=100)
    count: int | None = Field(None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one_size(self) -> WaveSpec:
        if (self.percent is None) == (self.count is None):
            raise ValueError(f"wave {self.name!r} needs exactly one of percent or count")
        return self


class GateConfig(BaseModel):
    """When a wave passes (see server/rollouts/gates.py for how each is measured, and
    server/rollouts/sequential.py for the accuracy decision and its error rates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_frames: int = Field(200, ge=1, le=1_000_000, description="frames each device compared in shadow")
    min_shadow_seconds: float = Field(60.0, ge=0, le=7 * 86400, description="time each device spent in shadow")
    max_shadow_seconds: float = Field(
        3600.0, gt=0, le=30 * 86400,
        description="longest a wave collects evidence; then it pauses with 'not enough evidence' "
                    "(or passes on the offline gate's evidence with on_no_evidence='pass')")
    alpha: float = Field(0.05, gt=0, lt=0.5,
                         description="wrong-promotion rate: chance of passing a candidate worse by margin or more")
    beta: float = Field(0.05, gt=0, lt=0.5,
                        description="wrong-failure rate: chance of failing a candidate that is not worse")
    margin: float = Field(0.05, gt=0, le=0.5,
                          description="non-inferiority margin in accuracy on known-truth frames")
    first_look_frames: int = Field(20, ge=5, le=100_000,
                                   description="known-truth frames (pooled over the wave) at the first look")
    on_no_evidence: Literal["pause", "pass"] = Field(
        "pause", description="when max_shadow_seconds runs out undecided: pause, or let the offline gate's "
                             "evidence carry the wave if no gate failed")
    min_agreement: float = Field(0.8, ge=0, le=1,
                                 description="box agreement with the active model where it is confident, "
                                             "applied only where the active model is shown right")
    trusted_active_accuracy: float = Field(
        0.8, ge=0, le=1, description="the active model guards by agreement on a device only where the exact "
                                     "95% lower bound of its accuracy on known-truth frames reaches this")
    max_latency_ratio: float | None = Field(
        1.5, ge=1, description="candidate p99 budget on each device: the active model's own p99 there times "
                               "this (at least latency_headroom_ms more); None: no relative budget")
    latency_headroom_ms: float = Field(5.0, ge=0, description="the smallest budget above the active p99")
    max_latency_p99_ms: float | None = Field(None, gt=0, description="absolute candidate p99 budget; None: none")
    max_errors: int = Field(0, ge=0, description="candidate inference errors in the wave")
    max_install_failure_rate: float = Field(0.0, ge=0, le=1,
                                            description="share of the wave's devices that may fail to install")

    def evidence_rule(self) -> Rule:
        return Rule(alpha=self.alpha, beta=self.beta, margin=self.margin, first_look=self.first_look_frames)


# Gates earlier versions stored with their rollouts, no longer decided on (read as absent).
RETIRED_GATES = frozenset({"max_accuracy_drop"})


def default_waves() -> list[WaveSpec]:
    return [WaveSpec(name="canary", count=1), WaveSpec(name="10%", percent=10),
            WaveSpec(name="50%", percent=50), WaveSpec(name="100%", percent=100)]


def canary_then_fleet() -> list[WaveSpec]:
    return [WaveSpec(name="canary", count=1), WaveSpec(name="fleet", percent=100)]


def check_waves(waves: list[WaveSpec]) -> list[WaveSpec]:
    if not 1 <= len(waves) <= 20:
        raise ValueError("a rollout has 1 to 20 waves")
    percents = [w.percent for w in waves if w.percent is not None]
    if any(b <= a for a, b in zip(percents, percents[1:], strict=False)):
        raise ValueError("percent waves are cumulative: each must be larger than the one before")
    names = [w.name for w in waves]
    if len(set(names)) != len(names):
        raise ValueError("wave names must be unique")
    return waves


class RolloutCreate(BaseModel):
    """POST /api/v1/rollouts. Left out: the server's RolloutPolicy defaults (``gates`` given in part
    are merged over them)."""

    model_config = ConfigDict(extra="forbid")

    version: int | Literal["production"] = "production"
    selector: Selector = Field(default_factory=Selector)
    waves: list[WaveSpec] | None = Field(None, description="default: the policy's waves")
    gates: dict[str, Any] = Field(default_factory=dict, description="GateConfig fields overriding the policy's")
    mode: Mode | None = None
    on_failure: OnFailure | None = None
    require_approval: bool = Field(False, description="every wave waits for an operator's approval")
    reason: str = Field("", max_length=2000)

    @model_validator(mode="after")
    def _check(self) -> RolloutCreate:
        if self.waves is not None:
            check_waves(self.waves)
        unknown = set(self.gates) - set(GateConfig.model_fields)
        if unknown:
            raise ValueError(f"unknown gates: {', '.join(sorted(unknown))}")
        return self

    def merged_gates(self, defaults: GateConfig) -> GateConfig:
        return GateConfig.model_validate(defaults.model_dump() | self.gates)


class RolloutAction(BaseModel):
    """approve / pause / resume / abort / rollback: the reason goes into the audit log."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=2000)
