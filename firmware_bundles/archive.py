"""The bundle's on-disk layout and its deterministic tar writer.

A bundle is one plain (uncompressed) POSIX tar, members in this order:

- ``manifest.json``: the canonical manifest bytes (see ``BundleManifest.canonical_bytes``)
- ``manifest.sig``: the raw 64-byte ed25519 signature over exactly those bytes (binary, no base64)
- ``files/<path>``: each payload file, sorted by path

Uncompressed so a device can hash and extract members by seeking, with no inflate step
(models and engines barely compress). Every header is fixed (mtime 0, uid/gid 0, no
owner names, mode 0644), so the same inputs give byte-identical bundles.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Sequence
from typing import BinaryIO

from firmware_bundles.errors import FileMismatch
from firmware_bundles.fsutil import atomic_output
from firmware_bundles.manifest import FileEntry

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
FILES_PREFIX = "files/"
SIGNATURE_SIZE = 64
CHUNK_SIZE = 1024 * 1024


def member_name(entry: FileEntry) -> str:
    return FILES_PREFIX + entry.path


def _header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class HashingReader:
    """Pass-through reader that hashes what flows through it, to catch a source changing mid-copy."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.digest.update(data)
        return data


def hash_stream(source: BinaryIO) -> tuple[str, int]:
    """sha256 hex and byte count of a stream, read in chunks (never whole in memory)."""
    digest, size = hashlib.sha256(), 0
    while chunk := source.read(CHUNK_SIZE):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a file, read in chunks."""
    with open(path, "rb") as fh:
        return hash_stream(fh)[0]


def write_archive(
    out_path: str | os.PathLike[str],
    manifest_bytes: bytes,
    signature: bytes,
    sources: Sequence[tuple[FileEntry, Callable[[], BinaryIO]]],
) -> None:
    """Atomically write a bundle; each source is re-hashed while copied and must match its entry."""
    if len(signature) != SIGNATURE_SIZE:
        raise ValueError(f"signature must be {SIGNATURE_SIZE} bytes, got {len(signature)}")
    with (
        atomic_output(out_path) as out,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.addfile(_header(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
        tar.addfile(_header(SIGNATURE_NAME, len(signature)), io.BytesIO(signature))
        for entry, open_source in sorted(sources, key=lambda item: item[0].path):
            with open_source() as source:
                reader = HashingReader(source)
                try:
                    tar.addfile(_header(member_name(entry), entry.size), reader)
                except OSError as exc:
                    # tarfile raises when the source ends before entry.size bytes.
                    raise FileMismatch(f"{entry.path} changed while being written ({exc})") from None
                if reader.digest.hexdigest() != entry.sha256 or source.read(1):
                    raise FileMismatch(f"{entry.path} changed while being written (sha256 or size differs)")
