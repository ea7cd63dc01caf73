"""The signed OTA bundle format: manifest schema, keys, build, sign, verify, unpack.

A bundle is one uncompressed tar: ``manifest.json`` (canonical JSON), ``manifest.sig``
(raw 64-byte ed25519 signature over those bytes) and ``files/<path>``. See ``archive``
for the layout and ``verify`` for the order of checks.
"""

from firmware_bundles.archive import FILES_PREFIX, MANIFEST_NAME, SIGNATURE_NAME, sha256_file
from firmware_bundles.build import build_bundle, infer_role, sign_manifest
from firmware_bundles.errors import (
    BundleDigestMismatch,
    BundleError,
    BundleNotFound,
    BundleTooLarge,
    DestinationExists,
    FileMismatch,
    FileMissing,
    KeyFileError,
    ManifestInvalid,
    ManifestMissing,
    NotATarArchive,
    RetiredKey,
    SignatureInvalid,
    SignatureMissing,
    TruncatedBundle,
    UnexpectedMember,
    UnknownKey,
    UnpackError,
    UnsafeMember,
)
from firmware_bundles.keys import (
    TrustStore,
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
    write_key_pair,
)
from firmware_bundles.manifest import (
    SCHEMA_VERSION,
    BundleManifest,
    FileEntry,
    HardwareTarget,
    InputSpec,
    Lineage,
    RuntimeEntry,
    agent_version_tuple,
)
from firmware_bundles.reader import DEFAULT_MAX_BYTES, BundleReader
from firmware_bundles.sign import sign_bundle
from firmware_bundles.summary import BundleSummary, inspect_bundle
from firmware_bundles.unpack import unpack_bundle
from firmware_bundles.verify import check_signature, verify_bundle

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FILES_PREFIX",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "BundleDigestMismatch",
    "BundleError",
    "BundleManifest",
    "BundleNotFound",
    "BundleReader",
    "BundleSummary",
    "BundleTooLarge",
    "DestinationExists",
    "FileEntry",
    "FileMismatch",
    "FileMissing",
    "HardwareTarget",
    "InputSpec",
    "KeyFileError",
    "Lineage",
    "ManifestInvalid",
    "ManifestMissing",
    "NotATarArchive",
    "RetiredKey",
    "RuntimeEntry",
    "SignatureInvalid",
    "SignatureMissing",
    "TrustStore",
    "TruncatedBundle",
    "UnexpectedMember",
    "UnknownKey",
    "UnpackError",
    "UnsafeMember",
    "agent_version_tuple",
    "build_bundle",
    "check_signature",
    "generate_private_key",
    "infer_role",
    "inspect_bundle",
    "key_id",
    "load_private_key",
    "load_public_key",
    "save_private_key",
    "save_public_key",
    "sha256_file",
    "sign_bundle",
    "sign_manifest",
    "unpack_bundle",
    "verify_bundle",
    "write_key_pair",
]
