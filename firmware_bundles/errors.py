"""Every error this package raises on purpose, rooted at ``BundleError``.

Each message is one line that names the problem for a human (an operator reading
``edgeloop bundle verify`` output, or an agent's update event), never a traceback.
"""

from __future__ import annotations


class BundleError(Exception):
    """Base of all bundle, key and trust failures."""


class BundleNotFound(BundleError):
    """The bundle path does not exist or is not a regular file."""


class NotATarArchive(BundleError):
    """The file is not an uncompressed tar archive."""


class BundleTooLarge(BundleError):
    """The bundle is over the caller's size limit."""


class BundleDigestMismatch(BundleError):
    """The whole-file sha256 differs from the one the caller expected."""


class UnsafeMember(BundleError):
    """A tar member with an unsafe name or type (traversal, link, device, duplicate)."""


class TruncatedBundle(BundleError):
    """The archive ends early: a member's data or the end-of-archive marker is missing."""


class ManifestMissing(BundleError):
    """No ``manifest.json`` in the archive."""


class ManifestInvalid(BundleError):
    """``manifest.json`` is not valid JSON, not the current schema, or not canonical."""


class SignatureMissing(BundleError):
    """No ``manifest.sig`` in the archive."""


class UnknownKey(BundleError):
    """The manifest names a signing key the trust store does not hold."""


class RetiredKey(BundleError):
    """The manifest names a signing key that has been retired."""


class SignatureInvalid(BundleError):
    """The signature does not verify over the manifest bytes."""


class FileMissing(BundleError):
    """A file listed in the manifest is not in the archive."""


class FileMismatch(BundleError):
    """A file's size or sha256 differs from the manifest."""


class UnexpectedMember(BundleError):
    """The archive holds a file the manifest does not list."""


class KeyFileError(BundleError):
    """A key file that cannot be read, has the wrong type, or would be overwritten."""


class DestinationExists(BundleError):
    """``unpack_bundle`` was pointed at a directory that already holds something."""


class UnpackError(BundleError):
    """Extraction failed after verification (disk full, permissions, a race on the destination)."""
