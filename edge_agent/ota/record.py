"""The persisted update record: written atomically (temp, fsync, rename) before each side effect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from edge_agent.ota.health import HealthBaseline
from edge_agent.ota.states import State
from firmware_bundles.fsutil import atomic_write_bytes


class UpdateRecord(BaseModel):
    # The deploy or rollback command this update carries out (its command_id).
    update_id: str = ""
    kind: Literal["deploy", "rollback"] = "deploy"
    # The version the update installs: a deploy's new version, or a rollback's target.
    version: int = 0
    state: State = State.IDLE
    bundle_url: str = ""
    bundle_sha256: str = ""
    bundle_size: int = 0
    mode: str = "shadow_then_switch"
    shadow_frames: int = 50
    # A rollout's deploy: after a passing shadow window, hold in SHADOWING (reporting further windows)
    # until the server promotes or aborts, instead of promoting itself.
    await_promotion: bool = False
    # Active when the update started: where a failed health check rolls back to.
    from_version: int | None = None
    # Set only by a verified, signed rollback command: lets an older bundle past rollback protection.
    allow_downgrade: bool = False
    # The slot ROLLING_BACK switches to.
    rollback_to: int | None = None
    # The replaced model's recent behaviour, frozen at PROMOTING for the post-switch health check.
    baseline: HealthBaseline | None = None
    reason: str = ""
    entries: dict[str, int] = Field(default_factory=dict)
    # Rollback commands already carried out (newest last, bounded): a replay is refused.
    seen_rollbacks: list[str] = Field(default_factory=list)


def save_record(path: Path, record: UpdateRecord) -> None:
    atomic_write_bytes(path, record.model_dump_json(indent=2).encode())


def load_record(path: Path) -> UpdateRecord:
    if not path.exists():
        return UpdateRecord()
    try:
        return UpdateRecord.model_validate(json.loads(path.read_text()))
    except (ValueError, OSError):
        # A record we cannot read must not brick the device: start clean, the active model stays.
        return UpdateRecord(reason="unreadable update record was reset")
