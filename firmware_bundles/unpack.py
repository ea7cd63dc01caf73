"""Verify a bundle and extract it into a model slot folder, all or nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from firmware_bundles.archive import MANIFEST_NAME, SIGNATURE_NAME
from firmware_bundles.errors import DestinationExists, UnpackError
from firmware_bundles.fsutil import fsync_dir
from firmware_bundles.manifest import BundleManifest
from firmware_bundles.reader import DEFAULT_MAX_BYTES, BundleReader
from firmware_bundles.verify import Trust, as_trust_store, verify_open


def _write_file(path: Path, chunks: Iterable[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as out:
        for chunk in chunks:
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(path, 0o644)


def unpack_bundle(
    path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    trust: Trust,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_sha256: str | None = None,
) -> BundleManifest:
    """Verify, then extract to ``dest_dir/<path>`` with ``manifest.json`` and ``manifest.sig`` beside.

    ``dest_dir`` must not exist or be empty. Files land in a hidden sibling temp folder
    that is renamed into place only when complete, so a failure leaves ``dest_dir`` as
    it was (a crash may leave a ``.<dest>.unpack-*`` folder, never a partial slot).
    Each file is hashed again while written: the result is exactly what was verified.
    """
    store = as_trust_store(trust)
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DestinationExists(f"{dest} already exists and is not an empty folder")
    with BundleReader(path, max_bytes=max_bytes, expected_sha256=expected_sha256) as reader:
        manifest = verify_open(reader, store)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.unpack-"))
        try:
            tmp.chmod(0o755)
            for entry in manifest.files:
                _write_file(tmp / entry.path, reader.iter_file(entry))
            _write_file(tmp / MANIFEST_NAME, [manifest.canonical_bytes()])
            _write_file(tmp / SIGNATURE_NAME, [reader.read_signature()])
            # Every folder entry on disk before the rename publishes the slot.
            folders = {tmp} | {
                tmp / parent for e in manifest.files for parent in PurePosixPath(e.path).parents
            }
            for folder in folders:
                fsync_dir(folder)
            # rename() replaces an empty folder atomically and fails on a non-empty one.
            os.rename(tmp, dest)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UnpackError(f"cannot unpack into {dest}: {exc.strerror or exc}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    fsync_dir(dest.parent)
    return manifest
