"""Unpacking: verified content lands complete in dest, or dest is left as it was."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from firmware_bundles import (
    DestinationExists,
    FileMismatch,
    UnknownKey,
    UnpackError,
    build_bundle,
    generate_private_key,
    unpack_bundle,
)
from firmware_bundles.verify import verify_bundle

MODEL_BYTES = b"weights" * 1000


@pytest.fixture()
def key():
    return generate_private_key()


@pytest.fixture()
def bundle(tmp_path, key) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.onnx").write_bytes(MODEL_BYTES)
    (src / "calib.bin").write_bytes(b"calibration")
    out = tmp_path / "bundles" / "bundle.tar"
    build_bundle(
        out,
        {"model.onnx": src / "model.onnx", "extra/calib.bin": src / "calib.bin"},
        private_key=key,
        model_name="detector",
        version=4,
        class_names=["a", "b"],
        input_spec=96,
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    return out


def _slots(tmp_path: Path) -> Path:
    slots = tmp_path / "slots"
    slots.mkdir()
    return slots


def test_unpack_round_trip(tmp_path, key, bundle) -> None:
    dest = _slots(tmp_path) / "v4"
    manifest = unpack_bundle(bundle, dest, key.public_key())
    assert manifest.version == 4
    assert (dest / "model.onnx").read_bytes() == MODEL_BYTES
    assert (dest / "extra" / "calib.bin").read_bytes() == b"calibration"
    assert (dest / "manifest.json").read_bytes() == manifest.canonical_bytes()
    assert len((dest / "manifest.sig").read_bytes()) == 64
    assert sorted(p.name for p in dest.parent.iterdir()) == ["v4"]  # no temp folder left behind


def test_unpack_into_existing_empty_folder(tmp_path, key, bundle) -> None:
    dest = _slots(tmp_path) / "v4"
    dest.mkdir()
    unpack_bundle(bundle, dest, key.public_key())
    assert (dest / "model.onnx").is_file()


def test_unpack_refuses_non_empty_destination_and_leaves_it_alone(tmp_path, key, bundle) -> None:
    dest = _slots(tmp_path) / "v4"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(DestinationExists):
        unpack_bundle(bundle, dest, key.public_key())
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_failed_verification_leaves_nothing(tmp_path, key, bundle) -> None:
    slots = _slots(tmp_path)
    with pytest.raises(UnknownKey):
        unpack_bundle(bundle, slots / "v4", generate_private_key().public_key())
    assert list(slots.iterdir()) == []


def test_tampered_bundle_leaves_nothing(tmp_path, key, bundle) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(bundle) as old, tarfile.open(evil, "w", format=tarfile.PAX_FORMAT) as new:
        for info in old.getmembers():
            data = old.extractfile(info).read()
            if info.name == "files/model.onnx":
                data = data[::-1]
            new.addfile(info, io.BytesIO(data))
    slots = _slots(tmp_path)
    with pytest.raises(FileMismatch):
        unpack_bundle(evil, slots / "v4", key.public_key())
    assert list(slots.iterdir()) == []


def test_failure_mid_extraction_leaves_nothing(tmp_path, key, bundle, monkeypatch) -> None:
    import firmware_bundles.unpack as unpack_module

    real_write = unpack_module._write_file
    calls = []

    def failing_write(path, chunks):
        calls.append(path)
        if len(calls) == 2:  # the first file is already on disk by now
            raise OSError(28, "No space left on device")
        real_write(path, chunks)

    monkeypatch.setattr(unpack_module, "_write_file", failing_write)
    slots = _slots(tmp_path)
    with pytest.raises(UnpackError, match="No space left"):
        unpack_bundle(bundle, slots / "v4", key.public_key())
    assert len(calls) == 2
    assert list(slots.iterdir()) == []


def test_unpacked_slot_can_be_reverified(tmp_path, key, bundle) -> None:
    dest = _slots(tmp_path) / "v4"
    unpack_bundle(bundle, dest, key.public_key())
    # The bundle itself is unchanged by unpacking and still verifies.
    assert verify_bundle(bundle, key.public_key()).version == 4
