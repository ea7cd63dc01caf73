"""Bundles pushed to and pulled from a real OCI registry (Debian's docker-registry, CNCF distribution).

Push then pull gives the byte-identical signed bundle; skopeo reads what was pushed; a
tampered blob, a tampered manifest, a wrong digest, an unsigned image, a foreign key and a
re-pointed tag are refused with their reason; a cut-off blob download resumes with Range.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from oci_registry_kit import (
    Cut,
    Registry,
    Rewrite,
    meddling_proxy,
    module_registry,
    running_registry,
)
from typer.testing import CliRunner

from firmware_bundles import (
    BundleDigestMismatch,
    SignatureMissing,
    build_bundle,
    generate_private_key,
    save_public_key,
    verify_bundle,
)
from firmware_bundles.cli import bundle_app
from firmware_bundles.oci import MEDIA_TYPE_CONFIG, export_oci, image_blobs
from firmware_bundles.oci_extract import extract_oci
from firmware_bundles.oci_registry import ImageRef, OciRegistryError, RegistryClient, pull, push
from firmware_bundles.reader import BundleReader

pytestmark = [pytest.mark.integration]

CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SKOPEO = shutil.which("skopeo")
runner = CliRunner()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    yield from module_registry(tmp_path_factory)


@pytest.fixture(scope="module")
def key():
    return generate_private_key()


@pytest.fixture()
def trust_file(tmp_path: Path, key) -> Path:
    path = tmp_path / "trusted.pub.pem"
    save_public_key(key.public_key(), path)
    return path


def _bundle(
    tmp_path: Path, key, *, name: str = "model", version: int = 7, payload: bytes | None = None
) -> Path:
    src = tmp_path / f"src-{name}-{version}"
    src.mkdir(parents=True, exist_ok=True)
    # Distinct content per (name, version): blobs are shared across repositories in storage.
    data = payload if payload is not None else hashlib.sha256(f"{name}{version}".encode()).digest() * 4096
    (src / "model.onnx").write_bytes(data)
    (src / "labels.txt").write_text("scratch\ndent\n")
    out = tmp_path / f"{name}-{version}.tar"
    build_bundle(
        out,
        {"model.onnx": src / "model.onnx", "labels.txt": src / "labels.txt"},
        private_key=key,
        model_name=name,
        version=version,
        class_names=["scratch", "dent"],
        input_spec=160,
        created_at=CREATED,
    )
    return out


def _pull_cli(ref: str, out: Path, trust: Path, *extra: str):
    return runner.invoke(bundle_app, ["pull", ref, "--out", str(out), "--trust", str(trust), *extra])


# -- the round trip -------------------------------------------------------------------


def test_push_then_pull_is_byte_identical_and_verifies(tmp_path, registry: Registry, key, trust_file) -> None:
    bundle = _bundle(tmp_path, key, name="model", version=7)
    ref = f"{registry.host}/edgeloop/model:7"
    pushed = push(bundle, ref)
    # The pushed image is exactly the one export_oci writes into an archive.
    archived = export_oci(bundle, tmp_path / "image.oci.tar", ref_name="7")
    assert pushed.manifest_digest == archived.manifest_digest
    assert pushed.image.layer_digest == archived.layer_digest
    assert len(pushed.uploaded) == 2
    # A second push uploads nothing (HEAD finds both blobs).
    assert push(bundle, ref).uploaded == ()

    result = pull(ref, tmp_path / "pulled.tar")
    assert (tmp_path / "pulled.tar").read_bytes() == bundle.read_bytes()
    assert result.manifest_digest == pushed.manifest_digest
    assert not result.verified  # the library pulls without checking the signature unless asked
    assert verify_bundle(tmp_path / "pulled.tar", key.public_key()).version == 7

    # By digest, with trust.
    by_digest = pull(
        f"{registry.host}/edgeloop/model@{pushed.manifest_digest}", tmp_path / "d.tar", trust=key.public_key()
    )
    assert by_digest.verified and (tmp_path / "d.tar").read_bytes() == bundle.read_bytes()

    # The CLI: push prints the digest, pull verifies with --trust.
    cli_push = runner.invoke(bundle_app, ["push", str(bundle), f"{registry.host}/edgeloop/cli"])
    assert cli_push.exit_code == 0, cli_push.output
    assert f"digest: {pushed.manifest_digest}" in cli_push.output
    assert f"{registry.host}/edgeloop/cli:7" in cli_push.output  # tag defaults to the version
    cli_pull = _pull_cli(
        f"{registry.host}/edgeloop/cli:7", tmp_path / "cli.tar", trust_file, "--expect-version", "7"
    )
    assert cli_pull.exit_code == 0, cli_pull.output
    assert "OK: model version 7" in cli_pull.output
    assert (tmp_path / "cli.tar").read_bytes() == bundle.read_bytes()


def test_cli_pull_needs_trust(tmp_path, registry: Registry, key) -> None:
    push(_bundle(tmp_path, key, name="notrust", version=1), f"{registry.host}/edgeloop/notrust:1")
    result = runner.invoke(
        bundle_app, ["pull", f"{registry.host}/edgeloop/notrust:1", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0
    assert "--trust" in result.output
    assert not (tmp_path / "o").exists()


# -- a foreign reader -----------------------------------------------------------------


def test_skopeo_reads_what_we_pushed(tmp_path, registry: Registry, key) -> None:
    bundle = _bundle(tmp_path, key, name="model", version=7)
    assert SKOPEO, "skopeo is not installed (deploy/setup.sh installs it)"
    pushed = push(bundle, f"{registry.host}/edgeloop/model:7")
    base = [SKOPEO, "--insecure-policy", "--tmpdir", str(tmp_path)]
    info = subprocess.run(
        [*base, "inspect", "--tls-verify=false", f"docker://{registry.host}/edgeloop/model:7"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    data = json.loads(info.stdout)
    assert data["Digest"] == pushed.manifest_digest
    assert data["Layers"] == [pushed.image.layer_digest]
    assert data["Labels"]["org.opencontainers.image.version"] == "7"
    assert data["Labels"]["io.edgeloop.bundle.sha256"] == pushed.image.bundle_sha256
    archive = tmp_path / "copied.oci.tar"
    subprocess.run(
        [
            *base,
            "copy",
            "--src-tls-verify=false",
            f"docker://{registry.host}/edgeloop/model:7",
            f"oci-archive:{archive}:7",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # skopeo recompresses the layer on the way; the bundle inside still reads back, byte for byte.
    extracted = extract_oci(archive, key.public_key(), tmp_path / "from-skopeo.tar")
    assert extracted.manifest.version == 7
    assert (tmp_path / "from-skopeo.tar").read_bytes() == bundle.read_bytes()


# -- refusals -------------------------------------------------------------------------


def test_tampered_blob_in_storage_is_refused(tmp_path, registry: Registry, key, trust_file) -> None:
    bundle = _bundle(tmp_path, key, name="tampered-blob", version=3)
    ref = f"{registry.host}/edgeloop/tampered-blob:3"
    pushed = push(bundle, ref)
    data_file = registry.blob_data_path(pushed.image.layer_digest)
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different bytes
    data_file.write_bytes(bytes(raw))
    with pytest.raises(BundleDigestMismatch, match="blob has sha256 .* the image manifest says"):
        pull(ref, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()
    result = _pull_cli(ref, tmp_path / "cli.tar", trust_file)
    assert result.exit_code != 0 and "the image manifest says" in result.output
    assert not (tmp_path / "cli.tar").exists()
    assert not list(tmp_path.glob(".oci-pull-*"))  # the work folder is gone


def _manifest(registry: Registry, name: str, ref: str) -> dict:
    with RegistryClient(registry.host) as client:
        data, _, _ = client.get_manifest(name, ref)
    return json.loads(data)


def _put(registry: Registry, name: str, tag: str, manifest: dict) -> str:
    with RegistryClient(registry.host) as client:
        return client.put_manifest(name, tag, json.dumps(manifest).encode())


def test_tampered_manifest_is_refused(tmp_path, registry: Registry, key) -> None:
    bundle = _bundle(tmp_path, key, name="tampered-manifest", version=4)
    name = "edgeloop/tampered-manifest"
    push(bundle, f"{registry.host}/{name}:4")
    good = _manifest(registry, name, "4")

    wrong_size = json.loads(json.dumps(good))
    wrong_size["layers"][0]["size"] += 1  # the registry only checks the blob exists
    _put(registry, name, "bad-size", wrong_size)
    with pytest.raises(BundleDigestMismatch, match="the image manifest says"):
        pull(f"{registry.host}/{name}:bad-size", tmp_path / "a.tar")

    wrong_layer = json.loads(json.dumps(good))
    wrong_layer["layers"][0]["digest"] = good["config"]["digest"]  # a blob that exists, not the layer
    wrong_layer["layers"][0]["size"] = good["config"]["size"]
    _put(registry, name, "bad-layer", wrong_layer)
    with pytest.raises(BundleDigestMismatch, match="rootfs.diff_ids"):
        pull(f"{registry.host}/{name}:bad-layer", tmp_path / "b.tar")
    assert not (tmp_path / "a.tar").exists() and not (tmp_path / "b.tar").exists()


def test_wrong_digest_is_refused(tmp_path, registry: Registry, key) -> None:
    bundle = _bundle(tmp_path, key, name="digest", version=5)
    pushed = push(bundle, f"{registry.host}/edgeloop/digest:5")
    unknown = "sha256:" + "0" * 64
    with pytest.raises(OciRegistryError) as err:
        pull(f"{registry.host}/edgeloop/digest@{unknown}", tmp_path / "o.tar")
    assert err.value.code == "MANIFEST_UNKNOWN" and err.value.status == 404
    # A registry (here a proxy) that answers a digest with other bytes is caught by the client.
    other = _bundle(tmp_path, key, name="digest", version=6)
    push(other, f"{registry.host}/edgeloop/digest:6")
    other_bytes = json.dumps(_manifest(registry, "edgeloop/digest", "6")).encode()
    with meddling_proxy(registry.host) as proxy:
        proxy.rules.append(lambda m, p, h: Rewrite(lambda _old: other_bytes) if "/manifests/" in p else None)
        with pytest.raises(BundleDigestMismatch, match=f"for {pushed.manifest_digest}"):
            pull(f"{proxy.host}/edgeloop/digest@{pushed.manifest_digest}", tmp_path / "o.tar")
    assert not (tmp_path / "o.tar").exists()


def test_retagged_image_is_reported_and_expect_version_refuses(
    tmp_path, registry: Registry, key, trust_file
) -> None:
    ref = f"{registry.host}/edgeloop/retag:7"
    push(_bundle(tmp_path, key, name="retag", version=7), ref)
    v8 = _bundle(tmp_path, key, name="retag", version=8)
    push(v8, ref)  # the tag now serves another (validly signed) image
    refused = _pull_cli(ref, tmp_path / "a.tar", trust_file, "--expect-version", "7")
    assert refused.exit_code != 0
    assert "version 8, expected version 7" in refused.output
    assert not (tmp_path / "a.tar").exists()
    reported = _pull_cli(ref, tmp_path / "b.tar", trust_file)
    assert reported.exit_code == 0, reported.output
    assert "OK: retag version 8" in reported.output
    assert (tmp_path / "b.tar").read_bytes() == v8.read_bytes()


def test_foreign_key_is_refused_by_cli(tmp_path, registry: Registry, trust_file) -> None:
    ref = f"{registry.host}/edgeloop/foreign:1"
    push(_bundle(tmp_path, generate_private_key(), name="foreign", version=1), ref)
    result = _pull_cli(ref, tmp_path / "o.tar", trust_file)
    assert result.exit_code != 0 and result.output.strip().splitlines()[-1].startswith("error: ")
    assert "key" in result.output.lower()
    assert not (tmp_path / "o.tar").exists()
    assert pull(ref, tmp_path / "lib.tar").verified is False  # without trust the library writes it


def _unsigned_image(tmp_path: Path, bundle: Path, key) -> tuple[bytes, bytes, bytes]:
    """Config, manifest and layer of the bundle's image with manifest.sig left out of the layer."""
    with BundleReader(bundle) as reader:
        manifest, _ = reader.read_manifest()
        sha = reader.file_sha256()
    archive = export_oci(bundle, tmp_path / "signed.oci.tar")
    with tarfile.open(archive.path) as outer:
        layer = outer.extractfile(f"blobs/sha256/{archive.layer_digest[7:]}").read()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(layer)) as src, tarfile.open(fileobj=buffer, mode="w") as dst:
        for info in src.getmembers():
            if not info.name.endswith("manifest.sig"):
                dst.addfile(info, src.extractfile(info) if info.isfile() else None)
    unsigned = buffer.getvalue()
    digest = "sha256:" + hashlib.sha256(unsigned).hexdigest()
    config, image_manifest, _ = image_blobs(
        manifest, sha, digest, len(unsigned), architecture="amd64", ref_name="1"
    )
    return config, image_manifest, unsigned


def test_unsigned_image_is_refused(tmp_path, registry: Registry, key, trust_file) -> None:
    bundle = _bundle(tmp_path, key, name="unsigned", version=1)
    config, image_manifest, layer = _unsigned_image(tmp_path, bundle, key)
    name = "edgeloop/unsigned"
    with RegistryClient(registry.host) as client:
        for blob in (config, layer):
            client.upload_blob(name, "sha256:" + hashlib.sha256(blob).hexdigest(), len(blob), blob)
        client.put_manifest(name, "1", image_manifest)
    assert json.loads(image_manifest)["config"]["mediaType"] == MEDIA_TYPE_CONFIG
    ref = f"{registry.host}/{name}:1"
    result = _pull_cli(ref, tmp_path / "o.tar", trust_file)
    assert result.exit_code != 0 and "unsigned" in result.output
    with pytest.raises(SignatureMissing):
        pull(ref, tmp_path / "lib.tar")
    assert not (tmp_path / "o.tar").exists() and not (tmp_path / "lib.tar").exists()


# -- resume ---------------------------------------------------------------------------


def test_interrupted_blob_download_resumes_with_range(tmp_path, registry: Registry, key) -> None:
    bundle = _bundle(tmp_path, key, name="resume", version=2, payload=bytes(range(256)) * 8192)  # 2 MiB
    pushed = push(bundle, f"{registry.host}/edgeloop/resume:2")
    layer_path = f"/blobs/{pushed.image.layer_digest}"
    cut_at = 300_000
    cuts = []

    def cut_first_layer_get(method: str, path: str, headers: dict[str, str]):
        if method == "GET" and path.endswith(layer_path) and not cuts:
            cuts.append(path)
            return Cut(after=cut_at)
        return None

    with meddling_proxy(registry.host) as proxy:
        proxy.rules.append(cut_first_layer_get)
        result = pull(f"{proxy.host}/edgeloop/resume:2", tmp_path / "out.tar", trust=key.public_key())
    gets = proxy.requests_to(layer_path)
    assert len(gets) == 2, [(g.path, g.headers.get("Range")) for g in gets]
    assert "Range" not in gets[0].headers
    assert gets[1].headers.get("Range") == f"bytes={cut_at}-"
    assert gets[1].status == 206
    assert result.verified and (tmp_path / "out.tar").read_bytes() == bundle.read_bytes()


def test_ref_parsing_and_push_to_digest_refused(tmp_path, registry: Registry, key) -> None:
    ref = ImageRef.parse(f"{registry.host}/edgeloop/model:7")
    assert (ref.host, ref.name, ref.tag, ref.digest) == (registry.host, "edgeloop/model", "7", None)
    with pytest.raises(ValueError, match="not a digest"):
        push(_bundle(tmp_path, key), f"{registry.host}/edgeloop/model@sha256:{'a' * 64}")


# -- auth -----------------------------------------------------------------------------


def test_htpasswd_auth_with_env_credentials(tmp_path, key, monkeypatch) -> None:
    import bcrypt  # htpasswd holds bcrypt hashes (a dev dependency)

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(b's3cret', bcrypt.gensalt()).decode()}\n")
    bundle = _bundle(tmp_path, key, name="authed", version=1)
    with running_registry(tmp_path / "reg", htpasswd=htpasswd) as reg:
        ref = f"{reg.host}/edgeloop/authed:1"
        monkeypatch.delenv("EDGELOOP_OCI_USERNAME", raising=False)
        with pytest.raises(OciRegistryError) as err:
            push(bundle, ref)
        assert err.value.status == 401
        monkeypatch.setenv("EDGELOOP_OCI_USERNAME", "ci")
        monkeypatch.setenv("EDGELOOP_OCI_PASSWORD", "s3cret")
        push(bundle, ref)
        pull(ref, tmp_path / "o.tar", trust=key.public_key())
        assert (tmp_path / "o.tar").read_bytes() == bundle.read_bytes()


def test_big_blob_is_uploaded_in_chunks(tmp_path, registry: Registry, key) -> None:
    bundle = _bundle(tmp_path, key, name="chunked", version=1, payload=bytes(range(256)) * 4096)  # 1 MiB
    with meddling_proxy(registry.host) as proxy:
        pushed = push(bundle, f"{proxy.host}/edgeloop/chunked:1", chunk_size=256 * 1024)
    patches = proxy.requests_to("/blobs/uploads/", method="PATCH")
    layer_size = registry.blob_data_path(pushed.image.layer_digest).stat().st_size
    assert len(patches) == -(-layer_size // (256 * 1024))  # only the layer is over the chunk size
    assert patches[0].headers["Content-Range"] == f"0-{256 * 1024 - 1}"
    assert all(p.status == 202 for p in patches)
    pull(f"{registry.host}/edgeloop/chunked:1", tmp_path / "o.tar", trust=key.public_key())
    assert (tmp_path / "o.tar").read_bytes() == bundle.read_bytes()
