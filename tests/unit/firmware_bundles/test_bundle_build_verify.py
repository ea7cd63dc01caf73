"""Build → verify round trips, determinism, tampering, keys and rotation."""

from __future__ import annotations

import io
import json
import os
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from firmware_bundles import (
    BundleDigestMismatch,
    BundleError,
    BundleTooLarge,
    FileMismatch,
    FileMissing,
    HardwareTarget,
    ManifestInvalid,
    RetiredKey,
    RuntimeEntry,
    SignatureInvalid,
    TrustStore,
    UnknownKey,
    build_bundle,
    generate_private_key,
    key_id,
    sign_bundle,
    verify_bundle,
)
from firmware_bundles.build import infer_role

CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
MODEL_BYTES = bytes(range(256)) * 40


def _sources(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "model.onnx").write_bytes(MODEL_BYTES)
    (src / "labels.txt").write_text("scratch\ndent\n")
    return {"model.onnx": src / "model.onnx", "labels.txt": src / "labels.txt"}


def _build(tmp_path: Path, key, out: str = "bundle.tar", **overrides):
    fields = {
        "private_key": key,
        "model_name": "detector",
        "version": 2,
        "class_names": ["scratch", "dent"],
        "input_spec": 160,
        "created_at": CREATED,
        "metrics": {"map50": 0.71},
    }
    fields.update(overrides)
    out_path = tmp_path / out
    manifest = build_bundle(out_path, _sources(tmp_path), **fields)
    return out_path, manifest


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes] | None = None) -> None:
    """Copy a bundle member by member, replacing some members' bytes."""
    replace = replace or {}
    with tarfile.open(src) as old, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as new:
        for info in old.getmembers():
            data = replace.get(info.name, old.extractfile(info).read())
            info.size = len(data)
            new.addfile(info, io.BytesIO(data))


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {info.name: tar.extractfile(info).read() for info in tar.getmembers()}


@pytest.fixture()
def key():
    return generate_private_key()


def test_round_trip(tmp_path, key) -> None:
    path, built = _build(tmp_path, key)
    verified = verify_bundle(path, key.public_key())
    assert verified == built
    assert verified.key_id == key_id(key.public_key())
    assert {f.path: f.role for f in verified.files} == {"labels.txt": "labels", "model.onnx": "model.onnx"}
    assert verified.file("model.onnx").size == len(MODEL_BYTES)
    assert [r.kind for r in verified.runtimes] == ["onnx"]
    assert verified.metrics == {"map50": 0.71}


def test_archive_layout(tmp_path, key) -> None:
    path, manifest = _build(tmp_path, key)
    with tarfile.open(path, "r:") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [
        "manifest.json",
        "manifest.sig",
        "files/labels.txt",
        "files/model.onnx",
    ]
    assert {(i.mtime, i.uid, i.gid, i.mode, i.uname, i.gname) for i in infos} == {(0, 0, 0, 0o644, "", "")}
    members = _members(path)
    assert members["manifest.json"] == manifest.canonical_bytes()
    assert len(members["manifest.sig"]) == 64
    assert members["files/model.onnx"] == MODEL_BYTES


def test_same_inputs_give_identical_bytes(tmp_path, key) -> None:
    first, _ = _build(tmp_path, key, out="a.tar")
    # Source mtimes must not leak into the archive.
    os.utime(tmp_path / "src" / "model.onnx", (1, 1))
    second, _ = _build(tmp_path, key, out="b.tar")
    assert first.read_bytes() == second.read_bytes()
    third, _ = _build(tmp_path, key, out="c.tar", version=3)
    assert third.read_bytes() != first.read_bytes()
    # The order in which files are given does not matter either.
    fields = {"private_key": key, "model_name": "m", "version": 1, "class_names": ["a"], "input_spec": 64}
    sources = _sources(tmp_path)
    forward = build_bundle(tmp_path / "f.tar", dict(sorted(sources.items())), created_at=CREATED, **fields)
    backward = build_bundle(
        tmp_path / "r.tar", dict(sorted(sources.items(), reverse=True)), created_at=CREATED, **fields
    )
    assert forward == backward
    assert (tmp_path / "f.tar").read_bytes() == (tmp_path / "r.tar").read_bytes()


def test_build_is_atomic_when_a_source_changes_mid_build(tmp_path, key, monkeypatch) -> None:
    out, _ = _build(tmp_path, key)
    before = out.read_bytes()
    # Simulate the source changing between hashing and copying: the hash recorded is stale.
    monkeypatch.setattr("firmware_bundles.build.hash_stream", lambda handle: ("0" * 64, len(handle.read())))
    with pytest.raises(FileMismatch, match="changed while being written"):
        _build(tmp_path, key, version=9)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar", "src"]


def test_missing_source_is_reported(tmp_path, key) -> None:
    with pytest.raises(FileMissing, match="not found"):
        build_bundle(
            tmp_path / "b.tar",
            {"model.onnx": tmp_path / "nope.onnx"},
            private_key=key,
            model_name="m",
            version=1,
            class_names=["a"],
            input_spec=64,
        )
    assert not (tmp_path / "b.tar").exists()


def test_engine_needs_explicit_runtime_and_fills_hardware_targets(tmp_path, key) -> None:
    (tmp_path / "m.engine").write_bytes(b"engine")
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    common = {"private_key": key, "model_name": "m", "version": 1, "class_names": ["a"], "input_spec": 64}
    files = {"model.onnx": tmp_path / "m.onnx", "model.engine": tmp_path / "m.engine"}
    with pytest.raises(ValueError, match="TensorRT"):
        build_bundle(tmp_path / "b.tar", files, **common)
    target = HardwareTarget(gpu_compute_capability="8.7", tensorrt_version="10.3.0")
    runtimes = [
        RuntimeEntry(kind="tensorrt", file="model.engine", precision="fp16", target=target),
        RuntimeEntry(kind="onnx", file="model.onnx"),
    ]
    manifest = build_bundle(tmp_path / "b.tar", files, runtimes=runtimes, **common)
    assert manifest.hardware_targets == [target]
    assert verify_bundle(tmp_path / "b.tar", key.public_key()).runtimes == runtimes


def test_invalid_manifest_fields_fail_the_build_with_a_reason(tmp_path, key) -> None:
    with pytest.raises(ManifestInvalid, match="model_name"):
        _build(tmp_path, key, model_name="../bad name")
    assert not (tmp_path / "bundle.tar").exists()


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("model.onnx", "model.onnx"),
        ("x.ENGINE", "model.engine"),
        ("labels.txt", "labels"),
        ("a.bin", "extra"),
    ],
)
def test_infer_role(name: str, role: str) -> None:
    assert infer_role(name) == role


def test_tampered_file_content_is_detected(tmp_path, key) -> None:
    path, _ = _build(tmp_path, key)
    evil = bytearray(MODEL_BYTES)
    evil[100] ^= 0xFF
    _rewrite(path, tmp_path / "evil.tar", {"files/model.onnx": bytes(evil)})
    with pytest.raises(FileMismatch, match="sha256 of files/model.onnx"):
        verify_bundle(tmp_path / "evil.tar", key.public_key())


def test_file_with_different_size_is_detected(tmp_path, key) -> None:
    path, _ = _build(tmp_path, key)
    _rewrite(path, tmp_path / "evil.tar", {"files/model.onnx": MODEL_BYTES + b"x"})
    with pytest.raises(FileMismatch, match="bytes, the manifest says"):
        verify_bundle(tmp_path / "evil.tar", key.public_key())


def test_tampered_manifest_is_detected(tmp_path, key) -> None:
    path, manifest = _build(tmp_path, key)
    forged = manifest.model_copy(update={"version": 99}).canonical_bytes()
    _rewrite(path, tmp_path / "evil.tar", {"manifest.json": forged})
    with pytest.raises(SignatureInvalid, match=f"signature does not verify with key {manifest.key_id}"):
        verify_bundle(tmp_path / "evil.tar", key.public_key())


def test_manifest_claiming_another_trusted_key_is_detected(tmp_path, key) -> None:
    other = generate_private_key()
    path, manifest = _build(tmp_path, key)
    forged = manifest.model_copy(update={"key_id": key_id(other.public_key())}).canonical_bytes()
    _rewrite(path, tmp_path / "evil.tar", {"manifest.json": forged})
    with pytest.raises(SignatureInvalid):
        verify_bundle(tmp_path / "evil.tar", TrustStore([key.public_key(), other.public_key()]))


def test_non_canonical_manifest_is_refused(tmp_path, key) -> None:
    path, manifest = _build(tmp_path, key)
    pretty = json.dumps(json.loads(manifest.canonical_bytes()), indent=2).encode()
    _rewrite(path, tmp_path / "evil.tar", {"manifest.json": pretty})
    with pytest.raises(ManifestInvalid, match="canonical"):
        verify_bundle(tmp_path / "evil.tar", key.public_key())


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"schema_version":2}', "schema_version 2 is not supported"),
        (b'{"schema_version":1}', "does not match the schema"),
    ],
)
def test_invalid_manifest_is_refused(tmp_path, key, payload: bytes, reason: str) -> None:
    path, _ = _build(tmp_path, key)
    _rewrite(path, tmp_path / "evil.tar", {"manifest.json": payload})
    with pytest.raises(ManifestInvalid, match=reason):
        verify_bundle(tmp_path / "evil.tar", key.public_key())


def test_malformed_signature_is_refused(tmp_path, key) -> None:
    path, _ = _build(tmp_path, key)
    _rewrite(path, tmp_path / "evil.tar", {"manifest.sig": b"\0" * 63})
    with pytest.raises(SignatureInvalid, match="64-byte"):
        verify_bundle(tmp_path / "evil.tar", key.public_key())


def test_wrong_key_is_refused_naming_the_signer(tmp_path, key) -> None:
    path, manifest = _build(tmp_path, key)
    stranger = generate_private_key().public_key()
    with pytest.raises(UnknownKey, match=f"signed by key {manifest.key_id}, which is not trusted"):
        verify_bundle(path, stranger)


def test_retired_key_is_refused(tmp_path, key) -> None:
    path, manifest = _build(tmp_path, key)
    store = TrustStore([key.public_key()], retired=[manifest.key_id])
    with pytest.raises(RetiredKey, match="retired"):
        verify_bundle(path, store)


def test_rotation(tmp_path, key) -> None:
    new_key = generate_private_key()
    old_id, new_id = key_id(key.public_key()), key_id(new_key.public_key())
    path, _ = _build(tmp_path, key)
    store = TrustStore([key.public_key(), new_key.public_key()])
    # Old bundles keep working while the old key is trusted and not retired.
    assert verify_bundle(path, store).key_id == old_id
    resigned = sign_bundle(path, new_key, out_path=tmp_path / "new.tar", trust=store)
    assert resigned.key_id == new_id
    store.retire(old_id)
    with pytest.raises(RetiredKey):
        verify_bundle(path, store)
    manifest = verify_bundle(tmp_path / "new.tar", store)
    assert manifest.key_id == new_id and manifest.version == 2
    # Only the key id (and so the signature) changed; the payload is byte-identical.
    assert _members(tmp_path / "new.tar")["files/model.onnx"] == MODEL_BYTES


def test_sign_in_place_and_refuse_laundering(tmp_path, key) -> None:
    path, manifest = _build(tmp_path, key)
    new_key = generate_private_key()
    sign_bundle(path, new_key)
    assert verify_bundle(path, new_key.public_key()).key_id == key_id(new_key.public_key())
    # With a trust store, a bundle the store does not trust is not re-signed.
    other = generate_private_key()
    before = path.read_bytes()
    with pytest.raises(UnknownKey):
        sign_bundle(path, other, trust=TrustStore([key.public_key()]))
    assert path.read_bytes() == before


def test_sign_refuses_tampered_content(tmp_path, key) -> None:
    path, _ = _build(tmp_path, key)
    _rewrite(path, tmp_path / "evil.tar", {"files/model.onnx": b"\0" * len(MODEL_BYTES)})
    with pytest.raises(FileMismatch):
        sign_bundle(tmp_path / "evil.tar", generate_private_key())


def test_size_limit(tmp_path, key) -> None:
    path, _ = _build(tmp_path, key)
    size = path.stat().st_size
    assert verify_bundle(path, key.public_key(), max_bytes=size)
    with pytest.raises(BundleTooLarge, match=f"{size} bytes, over the limit of {size - 1}"):
        verify_bundle(path, key.public_key(), max_bytes=size - 1)


def test_expected_sha256(tmp_path, key) -> None:
    import hashlib

    path, _ = _build(tmp_path, key)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert verify_bundle(path, key.public_key(), expected_sha256=digest.upper())
    with pytest.raises(BundleDigestMismatch, match="expected"):
        verify_bundle(path, key.public_key(), expected_sha256="0" * 64)


def test_trust_argument_type_is_checked(tmp_path, key) -> None:
    path, _ = _build(tmp_path, key)
    with pytest.raises(TypeError):
        verify_bundle(path, "not a key")  # type: ignore[arg-type]


def test_every_failure_is_a_bundle_error(tmp_path, key) -> None:
    with pytest.raises(BundleError, match="not found"):
        verify_bundle(tmp_path / "missing.tar", key.public_key())
