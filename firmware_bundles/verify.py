"""Verify a bundle end to end before anything trusts its content.

Checks run in this order, each failing with its own ``BundleError`` subclass:
file exists and is an uncompressed tar; size limit; optional whole-file sha256;
member names and types safe; archive complete (not truncated); manifest present
and valid; signature present; key trusted and not retired; signature valid; every
listed file present with its size and sha256; no unlisted files.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_bundles.errors import SignatureInvalid
from firmware_bundles.keys import TrustStore
from firmware_bundles.manifest import BundleManifest
from firmware_bundles.reader import DEFAULT_MAX_BYTES, BundleReader

Trust = TrustStore | Ed25519PublicKey


def as_trust_store(trust: Trust) -> TrustStore:
    if isinstance(trust, TrustStore):
        return trust
    if isinstance(trust, Ed25519PublicKey):
        return TrustStore([trust])
    raise TypeError(f"trust must be a TrustStore or an Ed25519PublicKey, not {type(trust).__name__}")


def check_signature(manifest: BundleManifest, manifest_bytes: bytes, signature: bytes, trust: Trust) -> None:
    """The manifest's key is trusted, not retired, and signed exactly ``manifest_bytes``."""
    public_key = as_trust_store(trust).get(manifest.key_id)
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureInvalid(f"signature does not verify with key {manifest.key_id}") from None


def verify_open(reader: BundleReader, trust: Trust) -> BundleManifest:
    """The content checks on an already opened (structurally checked) bundle."""
    manifest, manifest_bytes = reader.read_manifest()
    signature = reader.read_signature()
    check_signature(manifest, manifest_bytes, signature, trust)
    reader.check_files(manifest)
    reader.check_no_extras(manifest)
    return manifest


def verify_bundle(
    path: str | os.PathLike[str],
    trust: Trust,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_sha256: str | None = None,
) -> BundleManifest:
    """Return the manifest of a bundle that passed every check; raise a ``BundleError`` saying why not."""
    store = as_trust_store(trust)  # a wrong argument type fails before any I/O
    with BundleReader(path, max_bytes=max_bytes, expected_sha256=expected_sha256) as reader:
        return verify_open(reader, store)
