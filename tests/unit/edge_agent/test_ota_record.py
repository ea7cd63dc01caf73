"""The persisted update record: atomic save, round trip, and recovery from a corrupt file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.ota.record import UpdateRecord, load_record, save_record
from edge_agent.ota.states import State


def _record() -> UpdateRecord:
    return UpdateRecord(
        update_id="u-42", version=7, state=State.SHADOWING, bundle_url="https://store/b7.tar",
        bundle_sha256="cd" * 32, bundle_size=12345, mode="direct", shadow_frames=80, from_version=6,
        reason="started", entries={"DOWNLOADING": 1, "SHADOWING": 2},
    )


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "ota" / "update.json"  # parent is created
    record = _record()
    save_record(path, record)
    loaded = load_record(path)
    assert loaded == record
    assert loaded.state is State.SHADOWING


def test_save_leaves_no_temp_file_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "update.json"
    save_record(path, _record())
    save_record(path, _record().model_copy(update={"state": State.ACTIVE, "version": 8}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["update.json"]
    assert load_record(path).state is State.ACTIVE
    assert load_record(path).version == 8
    assert json.loads(path.read_text())["state"] == "ACTIVE"


def test_missing_file_is_a_fresh_idle_record_without_reason(tmp_path: Path) -> None:
    record = load_record(tmp_path / "nope.json")
    assert record == UpdateRecord()
    assert record.state is State.IDLE and record.reason == ""


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"\xff\xfe garbage", b"[]", b'{"state": "EXPLODED"}', b'{"version": "seven"}', b"null"],
)
def test_corrupt_file_loads_as_fresh_record_with_reason(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "update.json"
    path.write_bytes(content)
    record = load_record(path)
    assert record.state is State.IDLE
    assert record.version == 0 and record.update_id == ""
    assert "unreadable" in record.reason


def test_truncated_write_loads_as_fresh_record(tmp_path: Path) -> None:
    path = tmp_path / "update.json"
    save_record(path, _record())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert load_record(path).reason != ""
    assert load_record(path).state is State.IDLE
