"""Server alerts on MQTT: ``edgeloop/v1/alerts/{kind}``, QoS 1, never retained.

Operators' tools and the plant's systems subscribe here; the same alert also goes to the
webhook and the dashboard. Devices have no access to these topics (the broker ACL grants
devices only their own ``devices/<id>/`` subtree).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ALERT_ROOT = "edgeloop/v1/alerts"
ALERT_QOS = 1
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")


class AlertKind(StrEnum):
    MODEL_REJECTED = "model_rejected"
    DEVICE_QUARANTINED = "device_quarantined"
    DATA_CONTRACT_HALT = "data_contract_halt"
    DRIFT = "drift"
    PERFORMANCE_DECAY = "performance_decay"
    ROLLOUT = "rollout"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Alert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    type: Literal["alert"] = "alert"
    id: int | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    kind: AlertKind
    severity: Severity
    subject: str = Field(default="", max_length=256)
    message: str = Field(max_length=4000)
    details: dict[str, Any] = Field(default_factory=dict)


def alert_topic(kind: AlertKind | str) -> str:
    kind = AlertKind(kind).value
    if not _KIND.fullmatch(kind):
        raise ValueError(f"bad alert kind {kind!r}")
    return f"{ALERT_ROOT}/{kind}"


def alert_subscription() -> str:
    return f"{ALERT_ROOT}/#"
