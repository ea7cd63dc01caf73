"""A signed bundle as an OCI image (``oci-archive``): the format, and the export.

The archive is an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``) in
one plain tar, as ``skopeo copy oci-archive:...`` reads it, so a bundle can go through any
OCI registry and be mounted as an image volume. The image has one uncompressed layer that
holds the bundle as an unpacked model slot::

    models/<model_name>/<version>/manifest.json   the signed canonical manifest
    models/<model_name>/<version>/manifest.sig    its raw ed25519 signature
    models/<model_name>/<version>/<path>          each payload file

The config carries os/architecture, ``rootfs.diff_ids`` and labels (model, version,
manifest and bundle sha256, key id); the image manifest carries the same annotations and
``index.json`` tags it with the model version. Every timestamp comes from the manifest's
``created_at`` and every tar header is fixed, so the same bundle gives the same bytes.
``oci_extract`` reads the bundle back out.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import os
import re
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path, PurePosixPath
from typing import IO, Any

from firmware_bundles.archive import MANIFEST_NAME, SIGNATURE_NAME, HashingReader, hash_stream
from firmware_bundles.errors import BundleError, FileMismatch
from firmware_bundles.fsutil import atomic_output
from firmware_bundles.manifest import BundleManifest, canonical_json
from firmware_bundles.reader import DEFAULT_MAX_BYTES, BundleReader
from firmware_bundles.verify import Trust, as_trust_store, verify_open

MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar"
# Registries and `docker push` often recompress layers; such an image still reads back.
MEDIA_TYPE_LAYER_GZIP = MEDIA_TYPE_LAYER + "+gzip"
OCI_LAYOUT_NAME = "oci-layout"
OCI_LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'
INDEX_NAME = "index.json"
BLOBS_DIR = "blobs/sha256"
REF_NAME = "org.opencontainers.image.ref.name"
MODELS_ROOT = "models"
LABEL_PREFIX = "io.edgeloop.bundle."
# GOARCH names, as the image spec wants them. A model file runs anywhere; the platform is
# only what pullers match on, so it is the device's, chosen at export.
ARCHITECTURES = ("amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64")
DEFAULT_ARCHITECTURE = "amd64"
_DIR_MODE, _FILE_MODE = 0o755, 0o644
# A Docker-style tag, which every registry and `skopeo ...:<tag>` accept.
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class OciArchiveError(BundleError):
    """The OCI archive's layout, index, image manifest or config is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class OciImage:
    """What an OCI archive holds: digests as registries and skopeo show them, and the bundle inside."""

    path: Path
    ref_name: str
    manifest_digest: str
    config_digest: str
    layer_digest: str
    architecture: str
    bundle_sha256: str
    manifest: BundleManifest


def slot_path(manifest: BundleManifest) -> str:
    """Where the bundle lands in the image's filesystem (no leading slash)."""
    return f"{MODELS_ROOT}/{manifest.model_name}/{manifest.version}"


def _tool_version() -> str:
    try:
        return importlib.metadata.version("edgeloop")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _rfc3339(manifest: BundleManifest) -> str:
    return manifest.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def image_labels(manifest: BundleManifest, bundle_sha256: str) -> dict[str, str]:
    """Config labels and image-manifest annotations (the same set) for a bundle."""
    return {
        "org.opencontainers.image.description": (
            f"edgeloop model bundle {manifest.model_name} v{manifest.version} at /{slot_path(manifest)}"
        ),
        **signed_labels(manifest, bundle_sha256),
        "io.edgeloop.version": _tool_version(),
    }


def signed_labels(manifest: BundleManifest, bundle_sha256: str) -> dict[str, str]:
    """The labels that restate the signed content; a reader refuses an image where they differ."""
    return {
        "org.opencontainers.image.created": _rfc3339(manifest),
        "org.opencontainers.image.title": manifest.model_name,
        "org.opencontainers.image.version": str(manifest.version),
        LABEL_PREFIX + "schema-version": str(manifest.schema_version),
        LABEL_PREFIX + "model-name": manifest.model_name,
        LABEL_PREFIX + "model-version": str(manifest.version),
        LABEL_PREFIX + "manifest-sha256": hashlib.sha256(manifest.canonical_bytes()).hexdigest(),
        LABEL_PREFIX + "sha256": bundle_sha256,
        LABEL_PREFIX + "key-id": manifest.key_id,
        LABEL_PREFIX + "min-agent-version": manifest.min_agent_version,
        LABEL_PREFIX + "path": "/" + slot_path(manifest),
    }


# -- export ---------------------------------------------------------------------------


def _header(name: str, size: int, mtime: int, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.size = 0 if directory else size
    info.mode = _DIR_MODE if directory else _FILE_MODE
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# Opens a member's content; entered with `with`, so a source may decline to close what it wraps.
Source = Callable[[], contextlib.AbstractContextManager[IO[bytes]]]


def _write_tar(out: IO[bytes], files: dict[str, tuple[int, Source, str | None]], mtime: int) -> None:
    """A deterministic tar: every parent folder, then names sorted; each source re-hashed if a digest is given."""
    folders = {str(parent) for name in files for parent in PurePosixPath(name).parents if str(parent) != "."}
    entries = sorted([(name, None) for name in folders] + [(name, files[name]) for name in files])
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, spec in entries:
            if spec is None:
                tar.addfile(_header(name, 0, mtime, directory=True))
                continue
            size, open_source, sha256 = spec
            with open_source() as source:
                reader = HashingReader(source)
                try:
                    tar.addfile(_header(name, size, mtime), reader)
                except OSError as exc:  # tarfile raises when the source ends early
                    raise FileMismatch(f"{name} changed while being exported ({exc})") from None
                if sha256 is not None and (reader.digest.hexdigest() != sha256 or source.read(1)):
                    raise FileMismatch(f"{name} changed while being exported (sha256 or size differs)")


def _bytes_source(data: bytes) -> tuple[int, Source, None]:
    return len(data), lambda: io.BytesIO(data), None


def _check_exportable(manifest: BundleManifest) -> None:
    for entry in manifest.files:
        # A ".wh." name in a layer deletes files in the image instead of adding one.
        if any(part.startswith(".wh.") for part in entry.path.split("/")):
            raise OciArchiveError(f"file {entry.path!r} would be read as an OCI whiteout (a name starting '.wh.')")


def _descriptor(media_type: str, data_or_digest: bytes | str, size: int | None = None) -> dict[str, Any]:
    if isinstance(data_or_digest, bytes):
        digest, size = "sha256:" + hashlib.sha256(data_or_digest).hexdigest(), len(data_or_digest)
    else:
        digest = data_or_digest
    return {"mediaType": media_type, "digest": digest, "size": size}


def image_blobs(
    manifest: BundleManifest,
    bundle_sha256: str,
    layer_digest: str,
    layer_size: int,
    *,
    architecture: str,
    ref_name: str,
) -> tuple[bytes, bytes, bytes]:
    """The image config, image manifest and ``index.json`` bytes for a bundle's layer."""
    created = _rfc3339(manifest)
    labels = image_labels(manifest, bundle_sha256)
    config = canonical_json(
        {
            "created": created,
            "architecture": architecture,
            "os": "linux",
            "config": {"Labels": labels},
            # Uncompressed layer: its diff_id is its digest.
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [
                {
                    "created": created,
                    "created_by": "edgeloop bundle to-oci",
                    "comment": f"signed bundle {manifest.model_name} v{manifest.version}",
                }
            ],
        }
    )
    image_manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": _descriptor(MEDIA_TYPE_CONFIG, config),
            "layers": [_descriptor(MEDIA_TYPE_LAYER, layer_digest, layer_size)],
            "annotations": labels,
        }
    )
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [
                {
                    **_descriptor(MEDIA_TYPE_MANIFEST, image_manifest),
                    "platform": {"architecture": architecture, "os": "linux"},
                    "annotations": {REF_NAME: ref_name},
                }
            ],
        }
    )
    return config, image_manifest, index


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def export_oci(
    bundle_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    architecture: str = DEFAULT_ARCHITECTURE,
    ref_name: str | None = None,
    trust: Trust | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> OciImage:
    """Write a signed bundle as an ``oci-archive`` at ``out_path`` (atomically).

    With ``trust`` the bundle must verify first; without, it must at least be intact and
    carry a signature, so an unsigned bundle never becomes an image. The tag
    (``org.opencontainers.image.ref.name``) defaults to the model version.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r} (one of: {', '.join(ARCHITECTURES)})")
    if ref_name is not None and not _TAG_RE.match(ref_name):
        raise ValueError(f"{ref_name!r} is not a valid image tag (letters, digits, '_', '.', '-'; max 128)")
    out = Path(out_path)
    if out.exists() and out.resolve() == Path(bundle_path).resolve():
        raise ValueError("the OCI archive would overwrite the bundle it is made from")
    with BundleReader(bundle_path, max_bytes=max_bytes) as reader:
        if trust is not None:
            manifest = verify_open(reader, as_trust_store(trust))
        else:
            manifest, _ = reader.read_manifest()
            reader.check_files(manifest)
            reader.check_no_extras(manifest)
        signature = reader.read_signature()
        bundle_sha256 = reader.file_sha256()
        _check_exportable(manifest)
        mtime = int(manifest.created_at.timestamp())
        slot = slot_path(manifest)
        layer_files: dict[str, tuple[int, Source, str | None]] = {
            f"{slot}/{MANIFEST_NAME}": _bytes_source(manifest.canonical_bytes()),
            f"{slot}/{SIGNATURE_NAME}": _bytes_source(signature),
        }
        for entry in manifest.files:
            layer_files[f"{slot}/{entry.path}"] = (
                entry.size,
                lambda entry=entry: reader.open_file(entry),
                entry.sha256,
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        # The layer's digest names its blob, so it is written (beside the output) before the archive.
        with tempfile.TemporaryFile(dir=out.parent, prefix=f".{out.name}.layer-") as layer:
            _write_tar(layer, layer_files, mtime)
            layer.seek(0)
            layer_hex, layer_size = hash_stream(layer)
            tag = ref_name or str(manifest.version)
            config, image_manifest, index = image_blobs(
                manifest,
                bundle_sha256,
                "sha256:" + layer_hex,
                layer_size,
                architecture=architecture,
                ref_name=tag,
            )

            def layer_source() -> contextlib.AbstractContextManager[IO[bytes]]:
                layer.seek(0)
                # nullcontext: copying the layer into the archive must not close the temp file.
                return contextlib.nullcontext(layer)

            archive_files = {
                OCI_LAYOUT_NAME: _bytes_source(OCI_LAYOUT_BYTES),
                INDEX_NAME: _bytes_source(index),
                f"{BLOBS_DIR}/{_digest(config)[7:]}": _bytes_source(config),
                f"{BLOBS_DIR}/{_digest(image_manifest)[7:]}": _bytes_source(image_manifest),
                f"{BLOBS_DIR}/{layer_hex}": (layer_size, layer_source, layer_hex),
            }
            with atomic_output(out) as handle:
                _write_tar(handle, archive_files, mtime)
    return OciImage(
        path=out,
        ref_name=tag,
        manifest_digest=_digest(image_manifest),
        config_digest=_digest(config),
        layer_digest="sha256:" + layer_hex,
        architecture=architecture,
        bundle_sha256=bundle_sha256,
        manifest=manifest,
    )
