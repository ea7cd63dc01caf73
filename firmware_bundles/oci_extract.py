"""Pull a signed bundle back out of an OCI archive (``oci.export_oci``'s, or a registry copy of it).

The bundle is rebuilt from the image layer (the bundle writer is deterministic, so it is
byte-identical to the one exported) and verified like any bundle: trust comes from the
signature, never from the registry or the labels. Labels that disagree with the signed
manifest are refused, so ``skopeo inspect`` never shows a version the layer does not hold.
Layers recompressed with gzip on the way (skopeo's ``oci`` destinations and ``docker push``
do that) are read too, checked against both their blob digest and ``rootfs.diff_ids``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from firmware_bundles.archive import (
    CHUNK_SIZE,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    SIGNATURE_SIZE,
    HashingReader,
    sha256_file,
    write_archive,
)
from firmware_bundles.errors import (
    BundleDigestMismatch,
    BundleNotFound,
    BundleTooLarge,
    FileMismatch,
    FileMissing,
    ManifestInvalid,
    ManifestMissing,
    NotATarArchive,
    SignatureInvalid,
    SignatureMissing,
    TruncatedBundle,
    UnexpectedMember,
    UnsafeMember,
)
from firmware_bundles.fsutil import fsync_dir
from firmware_bundles.manifest import SCHEMA_VERSION, BundleManifest, check_relative_path
from firmware_bundles.oci import (
    BLOBS_DIR,
    INDEX_NAME,
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_LAYER,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_MANIFEST,
    MODELS_ROOT,
    OCI_LAYOUT_NAME,
    REF_NAME,
    OciArchiveError,
    OciImage,
    signed_labels,
    slot_path,
)
from firmware_bundles.reader import DEFAULT_MAX_BYTES, describe_validation_error
from firmware_bundles.verify import Trust, as_trust_store, verify_bundle

# index.json, image manifest and config are a few KB; anything big here is not ours.
MAX_METADATA_BYTES = 4 * 1024 * 1024
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")

def _hex_of(digest: object, what: str) -> str:
    match = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise OciArchiveError(f"{what} has digest {digest!r}; only sha256:<64 hex> is supported")
    return match.group(1)


def _safe_members(tar: tarfile.TarFile, what: str) -> dict[str, tarfile.TarInfo]:
    """Members by normalised name; links, devices, unsafe names and duplicates refused."""
    members: dict[str, tarfile.TarInfo] = {}
    try:
        infos = tar.getmembers()
    except tarfile.ReadError as exc:
        raise TruncatedBundle(f"{what} is truncated or corrupt ({exc})") from None
    for info in infos:
        # `tar -C layout .` writes "./oci-layout"; that is the same name.
        name = info.name[2:] if info.name.startswith("./") else info.name
        if name in ("", "."):
            continue
        try:
            check_relative_path(name)
        except ValueError as exc:
            raise UnsafeMember(f"unsafe member name in {what}: {exc}") from None
        if not (info.isreg() or info.isdir()):
            raise UnsafeMember(f"member {name!r} of {what} is not a regular file or folder")
        if name in members:
            raise UnsafeMember(f"member {name!r} appears twice in {what}")
        members[name] = info
    return members


def json_object(name: str, data: bytes, error: type[Exception] = OciArchiveError) -> dict[str, Any]:
    """``data`` parsed as a JSON object, or ``error`` saying why not (an archive's or a registry's)."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{name} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise error(f"{name} is not a JSON object")
    return value


def describe(descriptor: object, what: str, error: type[Exception] = OciArchiveError) -> tuple[str, int]:
    """A descriptor's hex sha256 digest and size, or ``error`` saying which is missing."""
    if not isinstance(descriptor, dict):
        raise error(f"{what} descriptor is not a JSON object")
    size = descriptor.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise error(f"{what} descriptor has no valid size")
    return _hex_of(descriptor.get("digest"), what), size


class _OciArchive:
    """An opened oci-archive; every blob read back is checked against its digest and size."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        # Checked before open(): opening a FIFO would block forever.
        if path.exists() and not path.is_file():
            raise BundleNotFound(f"{path} is not a regular file")
        try:
            self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise BundleNotFound(f"OCI archive not found: {path}") from None
        except OSError as exc:
            raise BundleNotFound(f"cannot open OCI archive {path}: {exc.strerror}") from None
        try:
            size = os.fstat(self._fh.fileno()).st_size
            if size > max_bytes:
                raise BundleTooLarge(f"OCI archive is {size} bytes, over the limit of {max_bytes} bytes")
            try:
                self._tar = tarfile.open(fileobj=self._fh, mode="r:")  # noqa: SIM115 - closed by close()
            except tarfile.ReadError as exc:
                raise NotATarArchive(f"{path} is not an uncompressed tar archive ({exc})") from None
            self.members = _safe_members(self._tar, "the OCI archive")
        except BaseException:
            self._fh.close()
            raise

    def close(self) -> None:
        self._tar.close()
        self._fh.close()

    def _open(self, name: str) -> tuple[tarfile.TarInfo, IO[bytes]]:
        info = self.members.get(name)
        if info is None or not info.isreg():
            raise OciArchiveError(f"OCI archive has no {name} (not an OCI image archive, or cut short)")
        stream = self._tar.extractfile(info)
        assert stream is not None  # regular file
        return info, stream

    def read_small(self, name: str) -> bytes:
        info, stream = self._open(name)
        if info.size > MAX_METADATA_BYTES:
            raise OciArchiveError(f"{name} is {info.size} bytes, over the {MAX_METADATA_BYTES} byte limit")
        with stream:
            try:
                return stream.read()
            except tarfile.ReadError as exc:
                raise TruncatedBundle(f"OCI archive is truncated inside {name} ({exc})") from None

    def read_json(self, name: str, raw: bytes | None = None) -> dict[str, Any]:
        return json_object(name, self.read_small(name) if raw is None else raw)

    def blob_json(self, descriptor: object, what: str) -> dict[str, Any]:
        hex_digest, size = self._describe(descriptor, what)
        name = f"{BLOBS_DIR}/{hex_digest}"
        data = self.read_small(name)
        if len(data) != size or hashlib.sha256(data).hexdigest() != hex_digest:
            raise BundleDigestMismatch(f"{what} blob does not match its digest sha256:{hex_digest}")
        return self.read_json(name, data)

    @contextlib.contextmanager
    def blob_stream(self, descriptor: object, what: str) -> Iterator[tuple[IO[bytes], str, int]]:
        hex_digest, size = self._describe(descriptor, what)
        info, stream = self._open(f"{BLOBS_DIR}/{hex_digest}")
        if info.size != size:
            raise BundleDigestMismatch(f"{what} blob is {info.size} bytes, its descriptor says {size}")
        with stream:
            yield stream, hex_digest, size

    @staticmethod
    def _describe(descriptor: object, what: str) -> tuple[str, int]:
        return describe(descriptor, what)


def _tag(descriptor: dict[str, Any]) -> object:
    annotations = descriptor.get("annotations")
    return annotations.get(REF_NAME) if isinstance(annotations, dict) else None


def _pick_manifest(index: dict[str, Any], ref_name: str | None) -> dict[str, Any]:
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise OciArchiveError("index.json has no list of manifests")

    candidates = [m for m in manifests if ref_name is None or _tag(m) == ref_name]
    if len(candidates) != 1:
        tags = ", ".join(str(_tag(m)) for m in manifests) or "none"
        wanted = "one image" if ref_name is None else f"one image tagged {ref_name!r}"
        raise OciArchiveError(f"index.json must list {wanted}, it lists {len(candidates)} (tags: {tags})")
    chosen = candidates[0]
    if chosen.get("mediaType") != MEDIA_TYPE_MANIFEST:
        raise OciArchiveError(
            f"the chosen image is a {chosen.get('mediaType')!r}, not an image manifest ({MEDIA_TYPE_MANIFEST})"
        )
    return chosen


def _copy_layer(stream: IO[bytes], media_type: str, spool: IO[bytes], max_bytes: int) -> tuple[str, str]:
    """Copy the layer uncompressed into ``spool``; return the sha256 of the blob and of the tar (diff_id)."""
    raw = HashingReader(stream)
    source: Any = gzip.GzipFile(fileobj=raw, mode="rb") if media_type == MEDIA_TYPE_LAYER_GZIP else raw
    diff, written = hashlib.sha256(), 0
    try:
        while chunk := source.read(CHUNK_SIZE):
            written += len(chunk)
            if written > max_bytes:  # also the bound on a gzip bomb
                raise BundleTooLarge(f"the image layer unpacks to more than {max_bytes} bytes")
            diff.update(chunk)
            spool.write(chunk)
        while raw.read(CHUNK_SIZE):  # gzip may stop before the blob's last bytes; hash them too
            pass
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise OciArchiveError(f"the image layer is not valid gzip ({exc})") from None
    except tarfile.ReadError as exc:
        raise TruncatedBundle(f"OCI archive is truncated inside the layer blob ({exc})") from None
    spool.flush()
    return raw.digest.hexdigest(), diff.hexdigest()


def _check_labels(found: object, expected: dict[str, str], where: str) -> None:
    if found is None:
        return
    if not isinstance(found, dict):
        raise OciArchiveError(f"{where} is not a JSON object")
    for key, value in expected.items():
        if key in found and found[key] != value:
            raise OciArchiveError(
                f"{where} say {key}={found[key]!r}, but the signed bundle says {value!r}"
            )


class _Layer:
    """The image layer's tar (uncompressed, spooled): the signed manifest, signature and files."""

    def __init__(self, spool: IO[bytes]) -> None:
        spool.seek(0)
        try:
            self._tar = tarfile.open(fileobj=spool, mode="r:")  # noqa: SIM115 - lives as long as the spool
        except tarfile.ReadError as exc:
            raise NotATarArchive(f"the image layer is not a tar archive ({exc})") from None
        self.members = _safe_members(self._tar, "the image layer")

    def read(self, info: tarfile.TarInfo) -> bytes:
        stream = self._tar.extractfile(info)
        assert stream is not None
        with stream:
            return stream.read()

    def open(self, info: tarfile.TarInfo) -> IO[bytes]:
        stream = self._tar.extractfile(info)
        assert stream is not None
        return stream

    def manifest(self) -> tuple[BundleManifest, bytes, str]:
        """The bundle manifest in ``models/<name>/<version>/``, its raw bytes, and that folder."""
        found = [
            name
            for name, info in self.members.items()
            if info.isreg() and len(parts := name.split("/")) == 4 and parts[0] == MODELS_ROOT
            and parts[3] == MANIFEST_NAME
        ]
        if len(found) != 1:
            raise ManifestMissing(
                f"the image layer must hold one {MODELS_ROOT}/<name>/<version>/{MANIFEST_NAME}, found {len(found)}"
            )
        info = self.members[found[0]]
        if info.size > MAX_METADATA_BYTES:
            raise ManifestInvalid(f"{found[0]} is {info.size} bytes, over the {MAX_METADATA_BYTES} byte limit")
        raw = self.read(info)
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
                raise ManifestInvalid(
                    f"{found[0]} is not a schema_version {SCHEMA_VERSION} bundle manifest"
                )
            manifest = BundleManifest.model_validate(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestInvalid(f"{found[0]} is not valid JSON ({exc})") from None
        except ValidationError as exc:
            raise ManifestInvalid(
                f"{found[0]} does not match the schema: {describe_validation_error(exc)}"
            ) from None
        slot = found[0].rsplit("/", 1)[0]
        if slot != slot_path(manifest):
            raise UnexpectedMember(
                f"the layer stores the manifest of {manifest.model_name} v{manifest.version} in /{slot}"
            )
        return manifest, raw, slot


def check_image_labels(image: _Image, manifest: BundleManifest, bundle_sha256: str) -> None:
    """The image's config labels and manifest annotations say what the rebuilt, signed bundle says."""
    expected = signed_labels(manifest, bundle_sha256)
    container_config = image.config.get("config")
    labels = container_config.get("Labels") if isinstance(container_config, dict) else None
    _check_labels(labels, expected, "image config labels")
    _check_labels(image.manifest.get("annotations"), expected, "image manifest annotations")


def _rebuild_bundle(layer: _Layer, out: Path) -> BundleManifest:
    """Write the bundle held in the layer to ``out``; the caller verifies it."""
    manifest, manifest_bytes, slot = layer.manifest()
    wanted = {f"{slot}/{MANIFEST_NAME}", f"{slot}/{SIGNATURE_NAME}"}
    wanted |= {f"{slot}/{entry.path}" for entry in manifest.files}
    for name, info in layer.members.items():
        if info.isreg() and name not in wanted:
            raise UnexpectedMember(f"the image layer holds {name!r}, which the bundle manifest does not list")
    sig_info = layer.members.get(f"{slot}/{SIGNATURE_NAME}")
    if sig_info is None or not sig_info.isreg():
        raise SignatureMissing(f"the image layer has no {slot}/{SIGNATURE_NAME} (it is unsigned)")
    if sig_info.size != SIGNATURE_SIZE:
        raise SignatureInvalid(
            f"{SIGNATURE_NAME} is {sig_info.size} bytes, expected a raw {SIGNATURE_SIZE}-byte ed25519 signature"
        )
    sources = []
    for entry in manifest.files:
        info = layer.members.get(f"{slot}/{entry.path}")
        if info is None or not info.isreg():
            raise FileMissing(f"{entry.path} is listed in the manifest but missing from the image layer")
        if info.size != entry.size:
            raise FileMismatch(f"{entry.path} is {info.size} bytes in the image, the manifest says {entry.size}")
        sources.append((entry, lambda info=info: layer.open(info)))
    # write_archive re-hashes every file against the manifest on the way.
    write_archive(out, manifest_bytes, layer.read(sig_info), sources)
    return manifest


@dataclass(frozen=True)
class _Image:
    """The checked metadata of the one image chosen from the archive."""

    descriptor: dict[str, Any]
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]
    layer: dict[str, Any]
    diff_id_hex: str


def _read_image(archive: _OciArchive, ref_name: str | None) -> _Image:
    """Layout, index, image manifest and config, each blob checked against its digest."""
    layout = archive.read_json(OCI_LAYOUT_NAME)
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise OciArchiveError(f"unsupported imageLayoutVersion {layout.get('imageLayoutVersion')!r}")
    descriptor = _pick_manifest(archive.read_json(INDEX_NAME), ref_name)
    image_manifest = archive.blob_json(descriptor, "image manifest")
    if image_manifest.get("mediaType", MEDIA_TYPE_MANIFEST) != MEDIA_TYPE_MANIFEST:
        raise OciArchiveError(f"image manifest has media type {image_manifest.get('mediaType')!r}")
    config_descriptor = image_manifest.get("config")
    if not isinstance(config_descriptor, dict) or config_descriptor.get("mediaType") != MEDIA_TYPE_CONFIG:
        raise OciArchiveError(f"image config must have media type {MEDIA_TYPE_CONFIG}")
    config = archive.blob_json(config_descriptor, "image config")
    layers = image_manifest.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise OciArchiveError("a bundle image has exactly one layer")
    if layers[0].get("mediaType") not in (MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_GZIP):
        raise OciArchiveError(
            f"layer media type {layers[0].get('mediaType')!r} is not supported ({MEDIA_TYPE_LAYER} or +gzip)"
        )
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != 1:
        raise OciArchiveError("image config must list exactly one rootfs.diff_id")
    return _Image(
        descriptor=descriptor,
        manifest=image_manifest,
        config_digest=str(config_descriptor["digest"]),
        config=config,
        layer=layers[0],
        diff_id_hex=_hex_of(diff_ids[0], "rootfs.diff_ids[0]"),
    )


def _rebuild_from_layer(archive: _OciArchive, image: _Image, work: Path, max_bytes: int) -> Path:
    """Spool the layer (uncompressed) into ``work``, check both digests, rebuild the bundle there."""
    with (
        archive.blob_stream(image.layer, "layer") as (stream, layer_hex, _),
        open(work / "layer.tar", "w+b") as spool,
    ):
        blob_hex, tar_hex = _copy_layer(stream, image.layer["mediaType"], spool, max_bytes)
        if blob_hex != layer_hex:
            raise BundleDigestMismatch(f"layer blob has sha256 {blob_hex}, its descriptor says {layer_hex}")
        if tar_hex != image.diff_id_hex:
            raise BundleDigestMismatch(
                f"layer content has sha256 {tar_hex}, rootfs.diff_ids says {image.diff_id_hex}"
            )
        bundle = work / "bundle.tar"
        _rebuild_bundle(_Layer(spool), bundle)
    return bundle


def extract_oci(
    archive_path: str | os.PathLike[str],
    trust: Trust,
    out_path: str | os.PathLike[str] | None = None,
    *,
    ref_name: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> OciImage:
    """Verify the bundle inside an oci-archive; with ``out_path``, write it there (atomically).

    Checks, in order: the layout and index; the image manifest, config and layer against
    their digests; ``rootfs.diff_ids``; the layer's content; then the rebuilt bundle as
    ``verify_bundle`` does (signature by a trusted, unretired key; every file's sha256);
    finally that the image's labels and annotations agree with the signed manifest.
    ``ref_name`` picks an image by tag when the archive holds several. Temporary files go
    beside ``out_path`` (or in the system temp folder) and are always removed.
    """
    store = as_trust_store(trust)
    out = Path(out_path) if out_path is not None else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(_OciArchive(Path(archive_path), max_bytes)) as archive:
        image = _read_image(archive, ref_name)
        work = Path(tempfile.mkdtemp(dir=out.parent if out is not None else None, prefix=".oci-extract-"))
        try:
            bundle = _rebuild_from_layer(archive, image, work, max_bytes)
            manifest = verify_bundle(bundle, store, max_bytes=max_bytes)
            bundle_sha256 = sha256_file(bundle)
            check_image_labels(image, manifest, bundle_sha256)
            if out is not None:
                os.replace(bundle, out)
                fsync_dir(out.parent)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return OciImage(
        path=Path(archive_path),
        ref_name=str(_tag(image.descriptor) or ""),
        manifest_digest=str(image.descriptor["digest"]),
        config_digest=image.config_digest,
        layer_digest=str(image.layer["digest"]),
        architecture=str(image.config.get("architecture")),
        bundle_sha256=bundle_sha256,
        manifest=manifest,
    )
