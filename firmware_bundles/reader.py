"""Read a bundle defensively: every structural check, one method per check.

``BundleReader`` opens the file once and keeps that handle, so a file swapped on disk
after a check cannot change what later checks (or the extraction) read. Opening it runs
the archive-level checks; ``verify``, ``inspect``, ``sign`` and ``unpack`` then call the
content checks they need, always in the same order.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from pydantic import ValidationError

from firmware_bundles.archive import (
    CHUNK_SIZE,
    FILES_PREFIX,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    SIGNATURE_SIZE,
    hash_stream,
    member_name,
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
from firmware_bundles.manifest import SCHEMA_VERSION, BundleManifest, FileEntry, check_relative_path

# Engines for big GPUs run to a few hundred MB; anything near this is a mistake or an attack.
DEFAULT_MAX_BYTES = 2 * 1024**3
MAX_MANIFEST_BYTES = 1024 * 1024
_END_MARKER_SIZE = 2 * tarfile.BLOCKSIZE
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """Pydantic errors as one line: ``field.path: message; ...``."""
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(p) for p in error["loc"]) or "manifest"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _member_kind(info: tarfile.TarInfo) -> str | None:
    """Why a member type is refused, or None when it is a plain file or folder."""
    if info.type in _REGULAR_TYPES or info.isdir():
        return None
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    if info.ischr() or info.isblk():
        return "a device node"
    if info.isfifo():
        return "a FIFO"
    return f"of unsupported type {info.type!r}"


class BundleReader:
    """An open bundle whose archive structure has passed every check."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        expected_sha256: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._fh = self._open_file()
        try:
            self.size = os.fstat(self._fh.fileno()).st_size
            self._tar = self._open_tar()
            self._check_size(max_bytes)
            if expected_sha256 is not None:
                self._check_digest(expected_sha256)
            self.members = self._read_members()
            self._check_complete()
        except BaseException:
            self._fh.close()
            raise

    # -- archive-level checks, run on open ---------------------------------------------

    def _open_file(self) -> BinaryIO:
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            raise BundleNotFound(f"bundle not found: {self.path}") from None
        # Checked before open(): opening a FIFO would block forever.
        if not stat.S_ISREG(mode):
            raise BundleNotFound(f"{self.path} is not a regular file")
        try:
            return open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise BundleNotFound(f"cannot open bundle {self.path}: {exc.strerror}") from None

    def _open_tar(self) -> tarfile.TarFile:
        try:
            # "r:" and never "r:*": a compressed bundle is refused, not silently inflated.
            return tarfile.open(fileobj=self._fh, mode="r:")
        except tarfile.ReadError as exc:
            if str(exc) == "truncated header":
                raise TruncatedBundle(f"{self.path} is truncated inside the first tar header") from None
            raise NotATarArchive(f"{self.path} is not an uncompressed tar archive ({exc})") from None

    def _check_size(self, max_bytes: int) -> None:
        if self.size > max_bytes:
            raise BundleTooLarge(f"bundle is {self.size} bytes, over the limit of {max_bytes} bytes")

    def _check_digest(self, expected: str) -> None:
        actual = self.file_sha256()
        if actual != expected.lower():
            raise BundleDigestMismatch(f"bundle sha256 is {actual}, expected {expected.lower()}")

    def _read_members(self) -> dict[str, tarfile.TarInfo]:
        members: dict[str, tarfile.TarInfo] = {}
        try:
            infos = self._tar.getmembers()
        except tarfile.ReadError as exc:
            # tarfile notices some cuts itself, when the data of the member just read ends early.
            if str(exc) == "unexpected end of data" and self._tar.members:
                name = self._tar.members[-1].name
                raise TruncatedBundle(f"archive is truncated: the data of {name!r} is cut short") from None
            raise TruncatedBundle(f"archive is truncated or corrupt ({exc})") from None
        for info in infos:
            try:
                check_relative_path(info.name)
            except ValueError as exc:
                raise UnsafeMember(f"unsafe member name: {exc}") from None
            kind = _member_kind(info)
            if kind is not None:
                raise UnsafeMember(f"member {info.name!r} is {kind}; only regular files are allowed")
            if info.name in members:
                # Two readers could disagree on which copy counts, so neither does.
                raise UnsafeMember(f"member {info.name!r} appears twice")
            members[info.name] = info
        return members

    def _check_complete(self) -> None:
        # tarfile stops quietly at a cut-off header, so completeness is checked here:
        # the last member's data and the two zero blocks that end a tar must all be present.
        infos = list(self.members.values())
        if infos:
            last = infos[-1]
            if last.offset_data + last.size > self.size:
                raise TruncatedBundle(f"archive is truncated: the data of {last.name!r} is cut short")
        end = self._tar.offset
        self._fh.seek(end)
        marker = self._fh.read(_END_MARKER_SIZE)
        if len(marker) < _END_MARKER_SIZE or marker.count(0) != _END_MARKER_SIZE:
            raise TruncatedBundle(f"archive is truncated or corrupt: no end-of-archive marker at byte {end}")
        # Anything but padding after the marker could be a second archive another reader would see.
        while chunk := self._fh.read(CHUNK_SIZE):
            if chunk.count(0) != len(chunk):
                raise UnexpectedMember("archive has data after its end-of-archive marker")

    # -- content checks, called by verify / inspect / sign / unpack ---------------------

    def _read_small(self, info: tarfile.TarInfo) -> bytes:
        extracted = self._tar.extractfile(info)
        assert extracted is not None  # only regular files get here
        with extracted:
            return extracted.read()

    def read_manifest(self) -> tuple[BundleManifest, bytes]:
        """The parsed manifest and the exact bytes it was parsed from (the signed bytes)."""
        info = self.members.get(MANIFEST_NAME)
        if info is None or info.isdir():
            raise ManifestMissing("bundle has no manifest.json")
        if info.size > MAX_MANIFEST_BYTES:
            raise ManifestInvalid(
                f"manifest.json is {info.size} bytes, over the {MAX_MANIFEST_BYTES} byte limit"
            )
        raw = self._read_small(info)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestInvalid(f"manifest.json is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ManifestInvalid("manifest.json is not a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            # Named apart from other schema errors: the usual cause is an agent older than the bundle.
            raise ManifestInvalid(
                f"manifest schema_version {data.get('schema_version')!r} is not supported "
                f"(this reader understands {SCHEMA_VERSION})"
            )
        try:
            manifest = BundleManifest.model_validate(data)
        except ValidationError as exc:
            raise ManifestInvalid(
                f"manifest.json does not match the schema: {describe_validation_error(exc)}"
            ) from None
        # One byte form per manifest, so a signature over these bytes is a signature over the content.
        if manifest.canonical_bytes() != raw:
            raise ManifestInvalid("manifest.json is not in canonical form (sorted keys, no whitespace)")
        return manifest, raw

    def read_signature(self) -> bytes:
        info = self.members.get(SIGNATURE_NAME)
        if info is None or info.isdir():
            raise SignatureMissing("bundle has no manifest.sig (it is unsigned)")
        if info.size != SIGNATURE_SIZE:
            raise SignatureInvalid(
                f"manifest.sig is {info.size} bytes, expected a raw {SIGNATURE_SIZE}-byte ed25519 signature"
            )
        return self._read_small(info)

    def _file_member(self, entry: FileEntry) -> tarfile.TarInfo:
        name = member_name(entry)
        info = self.members.get(name)
        if info is None or info.isdir():
            raise FileMissing(f"{name} is listed in the manifest but missing from the archive")
        if info.size != entry.size:
            raise FileMismatch(f"{name} is {info.size} bytes, the manifest says {entry.size}")
        return info

    def check_files(self, manifest: BundleManifest) -> None:
        """Every listed file present, with the listed size and sha256 (hashed in chunks)."""
        for entry in manifest.files:
            for _ in self.iter_file(entry):
                pass

    def check_no_extras(self, manifest: BundleManifest) -> None:
        expected = {MANIFEST_NAME, SIGNATURE_NAME} | {member_name(entry) for entry in manifest.files}
        for name, info in self.members.items():
            if not info.isdir() and name not in expected:
                where = "" if name.startswith(FILES_PREFIX) else " (outside files/)"
                raise UnexpectedMember(f"archive holds {name!r}{where}, which the manifest does not list")

    def iter_file(self, entry: FileEntry) -> Iterator[bytes]:
        """Yield a file's bytes in chunks; raise FileMismatch at the end if the sha256 differs.

        Callers writing the chunks somewhere must treat that output as garbage on error.
        """
        info = self._file_member(entry)
        extracted = self._tar.extractfile(info)
        assert extracted is not None
        digest = hashlib.sha256()
        with extracted:
            try:
                while chunk := extracted.read(CHUNK_SIZE):
                    digest.update(chunk)
                    yield chunk
            except tarfile.ReadError as exc:
                raise TruncatedBundle(f"archive is truncated inside {info.name} ({exc})") from None
        if digest.hexdigest() != entry.sha256:
            raise FileMismatch(
                f"sha256 of {info.name} is {digest.hexdigest()}, the manifest says {entry.sha256}"
            )

    def open_file(self, entry: FileEntry) -> BinaryIO:
        """A raw stream of one listed file (size checked, content not: callers re-hash)."""
        extracted = self._tar.extractfile(self._file_member(entry))
        assert extracted is not None
        return extracted

    def file_sha256(self) -> str:
        self._fh.seek(0)
        return hash_stream(self._fh)[0]

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        self._tar.close()
        self._fh.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
