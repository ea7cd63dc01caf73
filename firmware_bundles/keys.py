"""Ed25519 signing keys, their ids, and the set of public keys a verifier trusts.

Rotation: trust the new key beside the old one, re-sign bundles with the new key,
then retire the old id. A retired id is refused even while its key file is still
present, so retiring needs no file deletion on every device.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware_bundles.errors import KeyFileError, RetiredKey, UnknownKey
from firmware_bundles.fsutil import atomic_write_bytes

DEFAULT_KEY_NAME = "signing-key"
PUBLIC_KEY_GLOB = "*pub*.pem"
# Optional file in a trust directory: one retired key id per line, '#' starts a comment.
RETIRED_FILE_NAME = "retired-keys.txt"


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def save_private_key(
    key: Ed25519PrivateKey,
    path: str | os.PathLike[str],
    *,
    password: bytes | None = None,
    overwrite: bool = False,
) -> None:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    try:
        # 0600 from creation: the key is never readable by others, not even briefly.
        atomic_write_bytes(path, pem, mode=0o600, overwrite=overwrite)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None


def save_public_key(key: Ed25519PublicKey, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        atomic_write_bytes(path, pem, mode=0o644, overwrite=overwrite)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None


def write_key_pair(
    out_dir: str | os.PathLike[str], *, name: str = DEFAULT_KEY_NAME, overwrite: bool = False
) -> tuple[Path, Path, str]:
    """Generate a pair into ``out_dir/<name>.pem`` and ``<name>.pub.pem``; return both paths and the id."""
    out = Path(out_dir)
    private_path, public_path = out / f"{name}.pem", out / f"{name}.pub.pem"
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    key = generate_private_key()
    save_private_key(key, private_path, overwrite=overwrite)
    save_public_key(key.public_key(), public_path, overwrite=overwrite)
    return private_path, public_path, key_id(key.public_key())


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file not found: {path}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None


def load_private_key(path: str | os.PathLike[str], *, password: bytes | None = None) -> Ed25519PrivateKey:
    path = Path(path)
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        # Most often a public key passed where the private one is needed.
        raise KeyFileError(f"{path} is not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    path = Path(path)
    data = _read(path)
    if b"PRIVATE KEY" in data:
        # Refused rather than derived: private keys do not belong on verifiers.
        raise KeyFileError(f"{path} holds a private key; give the public key (.pub.pem) instead")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a readable PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an ed25519 public key")
    return key


def _read_retired(path: Path) -> set[str]:
    ids = set()
    for line in _read(path).decode("utf-8", errors="replace").splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            ids.add(entry.lower())
    return ids


class TrustStore:
    """Public keys trusted to sign bundles, by key id, minus the retired ids."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = (), *, retired: Iterable[str] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._retired: set[str] = {kid.lower() for kid in retired}
        for key in keys:
            self.add(key)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, retired: Iterable[str] = ()) -> TrustStore:
        """Load one public key file, or every ``*pub*.pem`` in a directory (plus its retired-keys.txt)."""
        path = Path(path)
        retired_ids = set(retired)
        if path.is_dir():
            key_files = sorted(path.glob(PUBLIC_KEY_GLOB))
            if not key_files:
                raise KeyFileError(f"no public keys ({PUBLIC_KEY_GLOB}) in {path}")
            if (path / RETIRED_FILE_NAME).is_file():
                retired_ids |= _read_retired(path / RETIRED_FILE_NAME)
        else:
            key_files = [path]
        return cls((load_public_key(p) for p in key_files), retired=retired_ids)

    def add(self, public_key: Ed25519PublicKey) -> str:
        kid = key_id(public_key)
        self._keys[kid] = public_key
        return kid

    def retire(self, kid: str) -> None:
        self._retired.add(kid.lower())

    @property
    def key_ids(self) -> list[str]:
        """Ids that currently verify (trusted and not retired)."""
        return sorted(kid for kid in self._keys if kid not in self._retired)

    @property
    def retired(self) -> frozenset[str]:
        return frozenset(self._retired)

    def get(self, kid: str) -> Ed25519PublicKey:
        """The key for ``kid``; raises RetiredKey or UnknownKey with the reason."""
        if kid in self._retired:
            raise RetiredKey(f"bundle is signed by key {kid}, which has been retired")
        try:
            return self._keys[kid]
        except KeyError:
            trusted = ", ".join(self.key_ids) or "none"
            raise UnknownKey(
                f"bundle is signed by key {kid}, which is not trusted (trusted: {trusted})"
            ) from None

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys and kid not in self._retired

    def __len__(self) -> int:
        return len(self.key_ids)
