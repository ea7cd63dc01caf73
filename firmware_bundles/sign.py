"""Re-sign an existing bundle with another key (key rotation) without rebuilding it."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_bundles.archive import write_archive
from firmware_bundles.build import sign_manifest
from firmware_bundles.keys import key_id
from firmware_bundles.manifest import BundleManifest
from firmware_bundles.reader import DEFAULT_MAX_BYTES, BundleReader
from firmware_bundles.verify import Trust, verify_open


def sign_bundle(
    path: str | os.PathLike[str],
    private_key: Ed25519PrivateKey,
    *,
    out_path: str | os.PathLike[str] | None = None,
    trust: Trust | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> BundleManifest:
    """Replace the bundle's signature (and manifest key_id) with ``private_key``'s.

    The files must still match the manifest. With ``trust``, the current signature
    must verify first, so rotation never launders a bundle nobody trusted. Writes
    ``out_path`` (default: in place), atomically.
    """
    with BundleReader(path, max_bytes=max_bytes) as reader:
        if trust is not None:
            manifest = verify_open(reader, trust)
        else:
            # An unsigned or foreign-signed bundle may be signed here, but its content must be intact.
            manifest, _ = reader.read_manifest()
            reader.check_files(manifest)
            reader.check_no_extras(manifest)
        new_manifest = BundleManifest.model_validate(
            {**manifest.model_dump(), "key_id": key_id(private_key.public_key())}
        )
        # Files stream from the open old archive; write_archive re-hashes them on the way.
        write_archive(
            Path(out_path) if out_path is not None else Path(path),
            new_manifest.canonical_bytes(),
            sign_manifest(new_manifest, private_key),
            [(entry, lambda entry=entry: reader.open_file(entry)) for entry in new_manifest.files],
        )
    return new_manifest
