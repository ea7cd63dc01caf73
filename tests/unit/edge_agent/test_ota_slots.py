"""Model slots: symlink switching, dangling links, pruning around pinned versions."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent.ota.slots import ModelSlots
from firmware_bundles import BundleManifest


def _install(slots: ModelSlots, version: int, *, onnx: bool = True) -> Path:
    name = "model.onnx" if onnx else "weights.engine"
    role = "model.onnx" if onnx else "model.engine"
    runtime = {"kind": "onnx", "file": name} if onnx else {
        "kind": "tensorrt", "file": name, "target": {"gpu_compute_capability": "8.7", "tensorrt_version": "10.3"}}
    manifest = BundleManifest.model_validate({
        "model_name": "detector",
        "version": version,
        "created_at": datetime(2024, 5, 1, tzinfo=UTC),
        "files": [{"path": name, "sha256": "ab" * 32, "size": 4, "role": role}],
        "runtimes": [runtime],
        "input": {"imgsz": 160},
        "class_names": ["scratch"],
        "key_id": "0123456789abcdef",
    })
    slot = slots.slot(version)
    slot.mkdir(parents=True)
    (slot / "manifest.json").write_bytes(manifest.canonical_bytes())
    (slot / name).write_bytes(b"fake")
    return slot


@pytest.fixture
def slots(tmp_path: Path) -> ModelSlots:
    return ModelSlots(tmp_path / "models")


def test_fresh_slots_have_nothing_active(slots: ModelSlots) -> None:
    assert slots.versions.is_dir()
    assert slots.active() is None and slots.previous() is None and slots.candidate() is None
    assert not slots.has(1)


def test_slot_paths_and_manifest(slots: ModelSlots) -> None:
    _install(slots, 3)
    assert slots.slot(3).name == "000003"
    assert slots.has(3)
    assert slots.manifest(3).version == 3
    assert slots.model_path(3) == slots.slot(3) / "model.onnx"


def test_model_path_without_onnx_raises(slots: ModelSlots) -> None:
    _install(slots, 4, onnx=False)
    with pytest.raises(FileNotFoundError, match="no ONNX"):
        slots.model_path(4)


def test_set_active_uses_relative_symlinks_and_tracks_previous(slots: ModelSlots) -> None:
    for v in (1, 2, 3):
        _install(slots, v)
    slots.set_active(1)
    link = slots.root / "active"
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link))
    assert link.resolve() == slots.slot(1).resolve()
    assert slots.active() == 1 and slots.previous() is None

    slots.set_active(2)
    assert slots.active() == 2 and slots.previous() == 1
    slots.set_active(2)  # re-activating the same version keeps previous
    assert slots.previous() == 1
    slots.set_active(3)
    assert slots.active() == 3 and slots.previous() == 2
    # no temp links left behind
    assert {p.name for p in slots.root.iterdir()} == {"versions", "active", "previous"}


def test_candidate_set_and_clear(slots: ModelSlots) -> None:
    _install(slots, 5)
    slots.set_candidate(5)
    assert slots.candidate() == 5
    slots.set_candidate(None)
    assert slots.candidate() is None
    assert not (slots.root / "candidate").is_symlink()
    slots.set_candidate(None)  # clearing twice is fine


def test_dangling_or_incomplete_slot_reads_as_none(slots: ModelSlots) -> None:
    _install(slots, 1)
    slots.set_active(1)
    (slots.slot(1) / "manifest.json").unlink()  # slot without manifest: not usable
    assert slots.active() is None

    _install(slots, 2)
    slots.set_active(2)
    shutil.rmtree(slots.slot(2))  # link now dangles
    assert (slots.root / "active").is_symlink()
    assert slots.active() is None


def test_link_to_a_non_version_name_reads_as_none(slots: ModelSlots) -> None:
    os.symlink("versions/garbage", slots.root / "active")
    assert slots.active() is None


def test_plain_file_instead_of_link_reads_as_none(slots: ModelSlots) -> None:
    (slots.root / "active").write_text("000001")
    _install(slots, 1)
    assert slots.active() is None


def test_remove_never_deletes_active_or_previous(slots: ModelSlots) -> None:
    for v in (1, 2, 3):
        _install(slots, v)
    slots.set_active(1)
    slots.set_active(2)
    slots.remove(1)
    slots.remove(2)
    slots.remove(3)
    assert slots.has(1) and slots.has(2)
    assert not slots.slot(3).exists()


def test_prune_keeps_newest_and_pinned(slots: ModelSlots) -> None:
    for v in range(1, 8):
        _install(slots, v)
    slots.set_active(1)
    slots.set_active(2)  # previous = 1
    slots.set_candidate(3)
    slots.prune(keep=2)
    remaining = sorted(int(p.name) for p in slots.versions.iterdir())
    assert remaining == [1, 2, 3, 6, 7]
    assert slots.active() == 2 and slots.previous() == 1 and slots.candidate() == 3


def test_prune_zero_keeps_only_pinned(slots: ModelSlots) -> None:
    for v in (1, 2, 3):
        _install(slots, v)
    slots.set_active(2)
    slots.prune(keep=0)
    assert sorted(int(p.name) for p in slots.versions.iterdir()) == [2]


def test_prune_ignores_non_version_folders(slots: ModelSlots) -> None:
    _install(slots, 1)
    (slots.versions / "tmp-unpack").mkdir()
    slots.prune(keep=0)
    assert (slots.versions / "tmp-unpack").is_dir()
    assert not slots.slot(1).exists()


def test_state_survives_a_new_instance(slots: ModelSlots) -> None:
    for v in (1, 2):
        _install(slots, v)
    slots.set_active(1)
    slots.set_active(2)
    slots.set_candidate(1)
    again = ModelSlots(slots.root)
    assert (again.active(), again.previous(), again.candidate()) == (2, 1, 1)
