"""Manifest schema rules and the canonical bytes that get signed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from firmware_bundles.manifest import (
    BundleManifest,
    FileEntry,
    HardwareTarget,
    InputSpec,
    RuntimeEntry,
    agent_version_tuple,
    check_relative_path,
)

SHA = "ab" * 32


def _fields(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "model_name": "detector",
        "version": 3,
        "created_at": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        "files": [{"path": "model.onnx", "sha256": SHA, "size": 10, "role": "model.onnx"}],
        "runtimes": [{"kind": "onnx", "file": "model.onnx"}],
        "input": {"imgsz": 160},
        "class_names": ["scratch", "dent"],
        "key_id": "0123456789abcdef",
    }
    fields.update(overrides)
    return fields


def test_canonical_bytes_are_sorted_compact_and_round_trip() -> None:
    manifest = BundleManifest.model_validate(_fields(metrics={"map50": 0.5}))
    raw = manifest.canonical_bytes()
    data = json.loads(raw)
    assert raw == json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    assert b" " not in raw and b"\n" not in raw
    assert list(data) == sorted(data)
    assert BundleManifest.model_validate(data).canonical_bytes() == raw


def test_defaults_are_filled() -> None:
    manifest = BundleManifest.model_validate(_fields())
    assert manifest.schema_version == 1
    assert manifest.input == InputSpec(imgsz=160, channels=3, layout="NCHW", format="RGB")
    assert manifest.input.letterbox is True and manifest.input.normalize == "0-1"
    assert manifest.metrics == {} and manifest.min_agent_version == "0.1.0"


def test_created_at_is_normalised_to_utc() -> None:
    local = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    manifest = BundleManifest.model_validate(_fields(created_at=local))
    assert json.loads(manifest.canonical_bytes())["created_at"] == "2024-05-01T12:00:00Z"


def test_naive_created_at_is_refused() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        BundleManifest.model_validate(_fields(created_at=datetime(2024, 5, 1)))


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        BundleManifest.model_validate(_fields(surprise=1))


def test_unknown_schema_version_is_refused() -> None:
    with pytest.raises(ValidationError, match="schema_version"):
        BundleManifest.model_validate(_fields(schema_version=2))


@pytest.mark.parametrize(
    "path", ["../evil", "/etc/passwd", "a/../b", "a//b", "./a", "a/", "", "a\\b", "a\x00b", "manifest.json"]
)
def test_unsafe_file_paths_are_refused(path: str) -> None:
    with pytest.raises(ValidationError):
        FileEntry(path=path, sha256=SHA, size=1)


def test_nested_relative_path_is_allowed() -> None:
    assert check_relative_path("extra/calib/data.bin") == "extra/calib/data.bin"


def test_file_cannot_also_be_a_folder() -> None:
    files = [
        {"path": "model.onnx", "sha256": SHA, "size": 1, "role": "model.onnx"},
        {"path": "model.onnx/x", "sha256": SHA, "size": 1},
    ]
    with pytest.raises(ValidationError, match="also used as a folder"):
        BundleManifest.model_validate(_fields(files=files))


def test_duplicate_file_paths_are_refused() -> None:
    entry = {"path": "model.onnx", "sha256": SHA, "size": 1, "role": "model.onnx"}
    with pytest.raises(ValidationError, match="unique"):
        BundleManifest.model_validate(_fields(files=[entry, entry]))


def test_runtime_must_reference_a_listed_file_of_the_right_role() -> None:
    with pytest.raises(ValidationError, match="not in files"):
        BundleManifest.model_validate(_fields(runtimes=[{"kind": "onnx", "file": "other.onnx"}]))
    files = [{"path": "model.onnx", "sha256": SHA, "size": 1, "role": "extra"}]
    with pytest.raises(ValidationError, match="role"):
        BundleManifest.model_validate(_fields(files=files))


def test_tensorrt_runtime_needs_a_target() -> None:
    with pytest.raises(ValidationError, match="target"):
        RuntimeEntry(kind="tensorrt", file="model.engine", precision="fp16")
    target = HardwareTarget(gpu_compute_capability="8.7", tensorrt_version="10.3.0")
    assert (
        RuntimeEntry(kind="tensorrt", file="model.engine", precision="fp16", target=target).target == target
    )


def test_non_finite_metrics_are_refused() -> None:
    with pytest.raises(ValidationError):
        BundleManifest.model_validate(_fields(metrics={"map50": float("nan")}))


@pytest.mark.parametrize(
    "bad", [{"version": 0}, {"class_names": []}, {"class_names": [" "]}, {"key_id": "XYZ"}]
)
def test_field_constraints(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        BundleManifest.model_validate(_fields(**bad))


def test_agent_version_tuple_pads_and_orders() -> None:
    assert agent_version_tuple("1.2") == agent_version_tuple("1.2.0")
    assert agent_version_tuple("0.10.0") > agent_version_tuple("0.9.9")
    with pytest.raises(ValueError):
        agent_version_tuple("1.x")
