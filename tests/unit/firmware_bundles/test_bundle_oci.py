"""Signed bundles as OCI images: layout, reproducibility, read-back, tampering, skopeo, CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from firmware_bundles import (
    BundleDigestMismatch,
    BundleError,
    BundleTooLarge,
    FileMismatch,
    NotATarArchive,
    RetiredKey,
    SignatureInvalid,
    SignatureMissing,
    TrustStore,
    UnexpectedMember,
    UnknownKey,
    build_bundle,
    generate_private_key,
    key_id,
    save_private_key,
    save_public_key,
)
from firmware_bundles.cli import bundle_app
from firmware_bundles.manifest import BundleManifest
from firmware_bundles.oci import (
    MEDIA_TYPE_LAYER,
    MEDIA_TYPE_LAYER_GZIP,
    OciArchiveError,
    export_oci,
    image_blobs,
)
from firmware_bundles.oci_extract import extract_oci

CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
MODEL_BYTES = bytes(range(256)) * 40
SLOT = "models/detector/2"
SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(
    SKOPEO is None, reason="skopeo is not installed (Debian: apt-get install skopeo; deploy/setup.sh does it)"
)


@pytest.fixture()
def key():
    return generate_private_key()


def _bundle(tmp_path: Path, key, name: str = "bundle.tar", **overrides) -> Path:
    src = tmp_path / "src"
    (src / "calib").mkdir(parents=True, exist_ok=True)
    (src / "model.onnx").write_bytes(MODEL_BYTES)
    (src / "labels.txt").write_text("scratch\ndent\n")
    (src / "calib" / "notes.txt").write_text("line 3, night shift")
    files = {
        "model.onnx": src / "model.onnx",
        "labels.txt": src / "labels.txt",
        "calib/notes.txt": src / "calib" / "notes.txt",
    }
    fields = {
        "private_key": key,
        "model_name": "detector",
        "version": 2,
        "class_names": ["scratch", "dent"],
        "input_spec": 160,
        "created_at": CREATED,
    }
    fields.update(overrides)
    out = tmp_path / name
    build_bundle(out, files, **fields)
    return out


def _members(archive: Path | bytes) -> dict[str, bytes]:
    fileobj = io.BytesIO(archive) if isinstance(archive, bytes) else open(archive, "rb")  # noqa: SIM115
    with fileobj, tarfile.open(fileobj=fileobj, mode="r:") as tar:
        return {i.name: tar.extractfile(i).read() for i in tar.getmembers() if i.isfile()}


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _image_json(archive: Path) -> tuple[dict, dict, dict, bytes]:
    """index.json, image manifest, config and the layer blob of an archive."""
    members = _members(archive)
    index = json.loads(members["index.json"])
    manifest = json.loads(members["blobs/sha256/" + index["manifests"][0]["digest"][7:]])
    config = json.loads(members["blobs/sha256/" + manifest["config"]["digest"][7:]])
    layer = members["blobs/sha256/" + manifest["layers"][0]["digest"][7:]]
    return index, manifest, config, layer


def _reassemble(
    archive: Path,
    out: Path,
    layer_files: dict[str, bytes],
    *,
    compress: bool = False,
    label_overrides: dict[str, str] | None = None,
    diff_id: str | None = None,
) -> Path:
    """A new archive around other layer content, every digest consistent (what a hostile registry can do)."""
    members = _members(archive)
    index, _, config, layer = _image_json(archive)
    bundle_manifest = BundleManifest.model_validate_json(_members(layer)[f"{SLOT}/manifest.json"])
    labels = config["config"]["Labels"]
    new_layer = _tar(layer_files)
    blob = gzip.compress(new_layer, mtime=0) if compress else new_layer
    new_config, new_manifest, new_index = image_blobs(
        bundle_manifest,
        labels["io.edgeloop.bundle.sha256"],
        _sha(new_layer),
        len(new_layer),
        architecture=config["architecture"],
        ref_name=index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
    )
    manifest_data = json.loads(new_manifest)
    manifest_data["layers"][0].update(
        {"digest": _sha(blob), "size": len(blob), "mediaType": MEDIA_TYPE_LAYER_GZIP if compress else MEDIA_TYPE_LAYER}
    )
    config_data = json.loads(new_config)
    for where in (manifest_data["annotations"], config_data["config"]["Labels"]):
        where.update(label_overrides or {})
    if diff_id is not None:
        config_data["rootfs"]["diff_ids"] = [diff_id]
    new_config = json.dumps(config_data).encode()
    manifest_data["config"].update({"digest": _sha(new_config), "size": len(new_config)})
    new_manifest = json.dumps(manifest_data).encode()
    index_data = json.loads(new_index)
    index_data["manifests"][0].update({"digest": _sha(new_manifest), "size": len(new_manifest)})
    files = {
        "oci-layout": members["oci-layout"],
        "index.json": json.dumps(index_data).encode(),
        **{f"blobs/sha256/{_sha(data)[7:]}": data for data in (new_config, new_manifest, blob)},
    }
    out.write_bytes(_tar(files))
    return out


# -- layout ---------------------------------------------------------------------------


def test_archive_is_an_oci_image_layout_with_one_layer_holding_the_signed_slot(tmp_path, key) -> None:
    bundle = _bundle(tmp_path, key)
    image = export_oci(bundle, tmp_path / "image.tar")
    with tarfile.open(image.path, "r:") as tar:
        infos = tar.getmembers()
    layer_hex, config_hex, manifest_hex = image.layer_digest[7:], image.config_digest[7:], image.manifest_digest[7:]
    assert [i.name for i in infos] == [
        "blobs",
        "blobs/sha256",
        *sorted(f"blobs/sha256/{h}" for h in (layer_hex, config_hex, manifest_hex)),
        "index.json",
        "oci-layout",
    ]
    # Fixed headers: owner root, time from the manifest, never the build machine's.
    assert {(i.uid, i.gid, i.uname, i.gname, i.mtime) for i in infos} == {(0, 0, "", "", int(CREATED.timestamp()))}
    members = _members(image.path)
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index, manifest, config, layer = _image_json(image.path)
    assert index["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "2"}
    assert index["manifests"][0]["digest"] == image.manifest_digest
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert manifest["layers"] == [{"mediaType": MEDIA_TYPE_LAYER, "digest": image.layer_digest, "size": len(layer)}]
    # Every blob is stored under its own digest.
    for name, data in members.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    assert config["rootfs"] == {"type": "layers", "diff_ids": [image.layer_digest]}
    assert (config["os"], config["architecture"], config["created"]) == ("linux", "amd64", "2024-05-01T12:00:00Z")
    bundle_members = _members(bundle)
    labels = config["config"]["Labels"]
    assert labels == manifest["annotations"]
    assert labels["org.opencontainers.image.version"] == "2"
    assert labels["org.opencontainers.image.title"] == "detector"
    assert labels["io.edgeloop.bundle.manifest-sha256"] == hashlib.sha256(bundle_members["manifest.json"]).hexdigest()
    assert labels["io.edgeloop.bundle.sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert labels["io.edgeloop.bundle.key-id"] == image.manifest.key_id
    assert labels["io.edgeloop.version"]
    # The layer is the bundle as an unpacked slot under /models/<name>/<version>/.
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:") as tar:
        kinds = {i.name: ("dir" if i.isdir() else "file", i.mode) for i in tar.getmembers()}
    assert kinds == {
        "models": ("dir", 0o755),
        "models/detector": ("dir", 0o755),
        SLOT: ("dir", 0o755),
        f"{SLOT}/calib": ("dir", 0o755),
        f"{SLOT}/calib/notes.txt": ("file", 0o644),
        f"{SLOT}/labels.txt": ("file", 0o644),
        f"{SLOT}/manifest.json": ("file", 0o644),
        f"{SLOT}/manifest.sig": ("file", 0o644),
        f"{SLOT}/model.onnx": ("file", 0o644),
    }
    slot = _members(layer)
    assert slot[f"{SLOT}/manifest.json"] == bundle_members["manifest.json"]
    assert slot[f"{SLOT}/manifest.sig"] == bundle_members["manifest.sig"]
    assert slot[f"{SLOT}/model.onnx"] == MODEL_BYTES


def test_same_bundle_gives_byte_identical_archives(tmp_path, key) -> None:
    bundle = _bundle(tmp_path, key)
    first = export_oci(bundle, tmp_path / "a.tar").path.read_bytes()
    # A rebuild of the same bundle elsewhere, from sources with other mtimes, exports to the same bytes.
    (tmp_path / "src" / "model.onnx").touch()
    again = _bundle(tmp_path, key, name="again.tar")
    assert export_oci(again, tmp_path / "b.tar").path.read_bytes() == first
    assert export_oci(bundle, tmp_path / "arm.tar", architecture="arm64").path.read_bytes() != first
    newer = _bundle(tmp_path, key, name="v3.tar", version=3)
    assert export_oci(newer, tmp_path / "c.tar").path.read_bytes() != first


def test_export_refuses_unsigned_tampered_untrusted_and_whiteout_bundles(tmp_path, key) -> None:
    bundle = _bundle(tmp_path, key)
    members = _members(bundle)
    unsigned = tmp_path / "unsigned.tar"
    unsigned.write_bytes(_tar({k: v for k, v in members.items() if k != "manifest.sig"}))
    with pytest.raises(SignatureMissing):
        export_oci(unsigned, tmp_path / "x.tar")
    tampered = tmp_path / "tampered.tar"
    tampered.write_bytes(_tar({**members, "files/model.onnx": MODEL_BYTES[::-1]}))
    with pytest.raises(FileMismatch, match="files/model.onnx"):
        export_oci(tampered, tmp_path / "x.tar")
    with pytest.raises(UnknownKey):
        export_oci(bundle, tmp_path / "x.tar", trust=generate_private_key().public_key())
    assert export_oci(bundle, tmp_path / "ok.tar", trust=key.public_key()).manifest.version == 2
    (tmp_path / "wh").write_bytes(b"x")
    whiteout = tmp_path / "wh.tar"
    build_bundle(
        whiteout,
        {"model.onnx": tmp_path / "src" / "model.onnx", "sub/.wh.cache": tmp_path / "wh"},
        private_key=key,
        model_name="m",
        version=1,
        class_names=["a"],
        input_spec=64,
    )
    with pytest.raises(OciArchiveError, match="whiteout"):
        export_oci(whiteout, tmp_path / "x.tar")
    with pytest.raises(ValueError, match="architecture"):
        export_oci(bundle, tmp_path / "x.tar", architecture="x86_64")
    with pytest.raises(ValueError, match="tag"):
        export_oci(bundle, tmp_path / "x.tar", ref_name="v2:latest")
    with pytest.raises(ValueError, match="overwrite the bundle"):
        export_oci(bundle, bundle)
    assert not (tmp_path / "x.tar").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- read back ------------------------------------------------------------------------


def test_extract_gives_back_the_exact_bundle_and_verifies_it(tmp_path, key) -> None:
    bundle = _bundle(tmp_path, key)
    exported = export_oci(bundle, tmp_path / "image.tar")
    out = tmp_path / "pulled" / "bundle.tar"
    pulled = extract_oci(exported.path, key.public_key(), out)
    assert out.read_bytes() == bundle.read_bytes()
    assert pulled.bundle_sha256 == exported.bundle_sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert (pulled.manifest_digest, pulled.config_digest, pulled.layer_digest) == (
        exported.manifest_digest,
        exported.config_digest,
        exported.layer_digest,
    )
    assert (pulled.ref_name, pulled.architecture, pulled.manifest) == ("2", "amd64", exported.manifest)
    # Verify-only leaves nothing behind; the work folder beside an output is gone too.
    assert extract_oci(exported.path, TrustStore([key.public_key()]), ref_name="2").manifest.version == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle.tar"]


def test_extract_refuses_untrusted_and_retired_keys(tmp_path, key) -> None:
    image = export_oci(_bundle(tmp_path, key), tmp_path / "image.tar").path
    with pytest.raises(UnknownKey):
        extract_oci(image, generate_private_key().public_key(), tmp_path / "out.tar")
    store = TrustStore([key.public_key()])
    store.retire(key_id(key.public_key()))
    with pytest.raises(RetiredKey):
        extract_oci(image, store, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def test_a_flipped_byte_in_the_layer_blob_is_refused(tmp_path, key) -> None:
    image = export_oci(_bundle(tmp_path, key), tmp_path / "image.tar")
    data = bytearray(image.path.read_bytes())
    offset = data.index(MODEL_BYTES[:512]) + 100
    data[offset] ^= 0xFF
    image.path.write_bytes(bytes(data))
    with pytest.raises(BundleDigestMismatch, match="layer blob"):
        extract_oci(image.path, key.public_key(), tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def test_a_consistently_rehashed_tampered_layer_is_refused_by_the_signature(tmp_path, key) -> None:
    """A registry can recompute every digest; only the bundle signature and file hashes stop it."""
    image = export_oci(_bundle(tmp_path, key), tmp_path / "image.tar").path
    slot = _members(_image_json(image)[3])
    evil_model = {**slot, f"{SLOT}/model.onnx": MODEL_BYTES[::-1]}
    with pytest.raises(FileMismatch, match="model.onnx"):
        extract_oci(_reassemble(image, tmp_path / "evil.tar", evil_model), key.public_key(), tmp_path / "o.tar")
    # A manifest edited to claim another class list no longer matches its signature.
    manifest = json.loads(slot[f"{SLOT}/manifest.json"])
    manifest["class_names"] = ["scratch", "dent", "ok"]
    edited = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    evil_manifest = {**slot, f"{SLOT}/manifest.json": edited}
    with pytest.raises(SignatureInvalid):
        extract_oci(_reassemble(image, tmp_path / "evil2.tar", evil_manifest), key.public_key())
    extra = {**slot, f"{SLOT}/payload.sh": b"#!/bin/sh\n"}
    with pytest.raises(UnexpectedMember, match="payload.sh"):
        extract_oci(_reassemble(image, tmp_path / "evil3.tar", extra), key.public_key())
    moved = {name.replace(SLOT, "models/detector/9"): data for name, data in slot.items()}
    with pytest.raises(UnexpectedMember, match="models/detector/9"):
        extract_oci(_reassemble(image, tmp_path / "evil4.tar", moved), key.public_key())
    # Labels that claim another version than the signed manifest are refused too.
    relabelled = _reassemble(
        image, tmp_path / "evil5.tar", slot, label_overrides={"org.opencontainers.image.version": "9"}
    )
    with pytest.raises(OciArchiveError, match="org.opencontainers.image.version='9'"):
        extract_oci(relabelled, key.public_key())
    assert not (tmp_path / "o.tar").exists()
    # The same reassembly with the real content reads back fine (the test helper itself is sound).
    assert extract_oci(_reassemble(image, tmp_path / "same.tar", slot), key.public_key()).manifest.version == 2


def test_a_gzip_recompressed_layer_reads_back(tmp_path, key) -> None:
    bundle = _bundle(tmp_path, key)
    image = export_oci(bundle, tmp_path / "image.tar").path
    slot = _members(_image_json(image)[3])
    recompressed = _reassemble(image, tmp_path / "gz.tar", slot, compress=True)
    assert _image_json(recompressed)[1]["layers"][0]["mediaType"] == MEDIA_TYPE_LAYER_GZIP
    extract_oci(recompressed, key.public_key(), tmp_path / "out.tar")
    assert (tmp_path / "out.tar").read_bytes() == bundle.read_bytes()
    # The config's diff_id pins the uncompressed content, independently of the blob digest.
    wrong = _reassemble(image, tmp_path / "gz2.tar", slot, compress=True, diff_id=_sha(b"other"))
    with pytest.raises(BundleDigestMismatch, match="rootfs.diff_ids"):
        extract_oci(wrong, key.public_key())
    # A small archive whose layer inflates past the size limit is stopped while inflating.
    bomb = _reassemble(image, tmp_path / "bomb.tar", {**slot, "zeros": bytes(4 * 1024 * 1024)}, compress=True)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(BundleTooLarge, match="unpacks to more than 100000 bytes"):
        extract_oci(bomb, key.public_key(), max_bytes=100_000)


def test_broken_archives_fail_with_a_bundle_error(tmp_path, key) -> None:
    image = export_oci(_bundle(tmp_path, key), tmp_path / "image.tar").path
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 200)
    with pytest.raises(NotATarArchive):
        extract_oci(tmp_path / "junk.tar", key.public_key())
    (tmp_path / "cut.tar").write_bytes(image.read_bytes()[:6000])
    with pytest.raises(BundleError):
        extract_oci(tmp_path / "cut.tar", key.public_key())
    with pytest.raises(OciArchiveError, match="tagged 'v9'.*tags: 2"):
        extract_oci(image, key.public_key(), ref_name="v9")
    members = _members(image)
    (tmp_path / "noindex.tar").write_bytes(_tar({k: v for k, v in members.items() if k != "index.json"}))
    with pytest.raises(OciArchiveError, match="no index.json"):
        extract_oci(tmp_path / "noindex.tar", key.public_key())
    # A plain bundle is not an OCI archive.
    with pytest.raises(OciArchiveError, match="oci-layout"):
        extract_oci(tmp_path / "bundle.tar", key.public_key())


# -- skopeo ---------------------------------------------------------------------------


def _skopeo(tmp_path: Path, *args: str) -> str:
    (tmp_path / "skopeo-tmp").mkdir(exist_ok=True)
    result = subprocess.run(
        [SKOPEO, "--insecure-policy", "--tmpdir", str(tmp_path / "skopeo-tmp"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_skopeo
def test_skopeo_inspects_the_archive(tmp_path, key) -> None:
    image = export_oci(_bundle(tmp_path, key), tmp_path / "image.tar", architecture="arm64")
    info = json.loads(_skopeo(tmp_path, "inspect", f"oci-archive:{image.path}"))
    assert info["Digest"] == image.manifest_digest
    assert (info["Architecture"], info["Os"]) == ("arm64", "linux")
    assert info["Layers"] == [image.layer_digest]
    assert info["Created"].startswith("2024-05-01T12:00:00")
    assert info["Labels"]["org.opencontainers.image.version"] == "2"
    assert info["Labels"]["io.edgeloop.bundle.key-id"] == image.manifest.key_id
    assert info["Labels"]["io.edgeloop.bundle.sha256"] == image.bundle_sha256
    # By tag, and the raw config.
    tagged = json.loads(_skopeo(tmp_path, "inspect", f"oci-archive:{image.path}:2"))
    assert tagged["Digest"] == image.manifest_digest
    config = json.loads(_skopeo(tmp_path, "inspect", "--config", f"oci-archive:{image.path}"))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [image.layer_digest]}
    assert config["config"]["Labels"] == info["Labels"]
    raw = _skopeo(tmp_path, "inspect", "--raw", f"oci-archive:{image.path}")
    assert _sha(raw.encode()) == image.manifest_digest


@needs_skopeo
def test_skopeo_copies_the_image_and_the_layer_is_the_slot(tmp_path, key) -> None:
    bundle = _bundle(tmp_path, key)
    image = export_oci(bundle, tmp_path / "image.tar")
    out = tmp_path / "dir-copy"
    _skopeo(tmp_path, "copy", "-q", f"oci-archive:{image.path}", f"dir:{out}")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [layer["digest"] for layer in manifest["layers"]] == [image.layer_digest]
    layer = (out / image.layer_digest[7:]).read_bytes()
    assert _sha(layer) == image.layer_digest
    slot = _members(layer)
    assert slot[f"{SLOT}/model.onnx"] == MODEL_BYTES
    assert slot[f"{SLOT}/manifest.json"] == _members(bundle)["manifest.json"]
    # skopeo's own oci-archive output (it gzips the layer) still gives back the exact bundle.
    copy = tmp_path / "copy.tar"
    _skopeo(tmp_path, "copy", "-q", f"oci-archive:{image.path}", f"oci-archive:{copy}:v2")
    pulled = extract_oci(copy, key.public_key(), tmp_path / "pulled.tar", ref_name="v2")
    assert (tmp_path / "pulled.tar").read_bytes() == bundle.read_bytes()
    assert pulled.ref_name == "v2"


# -- CLI ------------------------------------------------------------------------------

runner = CliRunner()


def _key_files(tmp_path: Path, key) -> tuple[Path, Path]:
    private, public = tmp_path / "keys" / "k.pem", tmp_path / "keys" / "k.pub.pem"
    save_private_key(key, private)
    save_public_key(key.public_key(), public)
    return private, public


def test_cli_build_oci_then_from_oci(tmp_path, key) -> None:
    private, public = _key_files(tmp_path, key)
    model = tmp_path / "best.onnx"
    model.write_bytes(MODEL_BYTES)
    args = ["build", "--model", str(model), "--version", "4", "--key", str(private)]
    args += ["--class-names", "a,b", "--imgsz", "96", "--out", str(tmp_path / "b.tar")]
    result = runner.invoke(bundle_app, [*args, "--oci", str(tmp_path / "img.tar"), "--oci-arch", "arm64"])
    assert result.exit_code == 0, result.output
    digest = re.search(r"image digest: (sha256:[0-9a-f]{64})", result.output).group(1)
    assert "tag 4, arm64" in result.output
    result = runner.invoke(
        bundle_app, ["from-oci", str(tmp_path / "img.tar"), "--key", str(public), "--out", str(tmp_path / "p.tar")]
    )
    assert result.exit_code == 0, result.output
    assert "OK: best version 4" in result.output and digest in result.output
    assert (tmp_path / "p.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    # to-oci of the built bundle gives the same image, byte for byte.
    result = runner.invoke(
        bundle_app,
        ["to-oci", str(tmp_path / "b.tar"), "--out", str(tmp_path / "again.tar"), "--arch", "arm64", "--key", str(public)],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again.tar").read_bytes() == (tmp_path / "img.tar").read_bytes()


def test_cli_oci_errors_are_one_line(tmp_path, key) -> None:
    private, public = _key_files(tmp_path, key)
    other = tmp_path / "other.pub.pem"
    save_public_key(generate_private_key().public_key(), other)
    model = tmp_path / "best.onnx"
    model.write_bytes(MODEL_BYTES)
    base = ["build", "--model", str(model), "--version", "1", "--key", str(private), "--class-names", "a"]
    base += ["--imgsz", "64", "--out", str(tmp_path / "b.tar")]
    result = runner.invoke(bundle_app, [*base, "--oci", str(tmp_path / "b.tar")])
    assert result.exit_code != 0 and "must be different" in result.output.strip().splitlines()[-1]
    result = runner.invoke(bundle_app, [*base, "--oci", str(tmp_path / "i.tar"), "--oci-arch", "x86_64"])
    assert result.exit_code != 0 and not (tmp_path / "i.tar").exists()
    assert runner.invoke(bundle_app, [*base, "--oci", str(tmp_path / "i.tar")]).exit_code == 0
    result = runner.invoke(bundle_app, ["from-oci", str(tmp_path / "i.tar"), "--key", str(other)])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code != 0 and last.startswith("error: bundle is signed by key") and "not trusted" in last
    result = runner.invoke(bundle_app, ["from-oci", str(tmp_path / "b.tar"), "--key", str(public)])
    assert result.exit_code != 0 and result.output.strip().splitlines()[-1] .startswith("error: OCI archive has no oci-layout")
