"""Signed commands: an ed25519 signature over a command's canonical JSON, made and checked with
the same keys (and ``TrustStore``) as bundles.

Used for the commands that lower a device's guard, a rollback above all: it is the one way
past rollback protection, so broker access alone must not be enough to send one. The command
model needs ``key_id`` and ``signature`` (hex) fields; the signature covers every other field
(device id, command id, timestamps, expiry included) as canonical JSON, so it cannot be moved
to another device or have its target changed. Works on any pydantic model, so this package
does not depend on ``protocol``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from firmware_bundles.errors import BundleError, RetiredKey, SignatureInvalid, SignatureMissing, UnknownKey
from firmware_bundles.keys import key_id
from firmware_bundles.manifest import canonical_json
from firmware_bundles.verify import Trust, as_trust_store

SIGNATURE_FIELD = "signature"
KEY_ID_FIELD = "key_id"

M = TypeVar("M", bound=BaseModel)


class CommandExpired(BundleError):
    """A signed command whose ``expires_at`` has passed (a replay, or a very late delivery)."""


def signing_bytes(command: BaseModel) -> bytes:
    """The exact bytes signed: every field but the signature, as canonical JSON."""
    return canonical_json(command.model_dump(mode="json", exclude={SIGNATURE_FIELD}))


def sign_command(command: M, private_key: Ed25519PrivateKey) -> M:
    """A copy of ``command`` with ``key_id`` set and ``signature`` over the rest."""
    unsigned = command.model_copy(update={KEY_ID_FIELD: key_id(private_key.public_key()), SIGNATURE_FIELD: None})
    signature = private_key.sign(signing_bytes(unsigned)).hex()
    return unsigned.model_copy(update={SIGNATURE_FIELD: signature})


def verify_command(command: BaseModel, trust: Trust, *, now: datetime | None = None) -> str:
    """Return the signing key id; raise a ``BundleError`` subclass saying why the command is refused."""
    name = getattr(command, "type", type(command).__name__)
    kid, signature = getattr(command, KEY_ID_FIELD, None), getattr(command, SIGNATURE_FIELD, None)
    if not kid or not signature:
        raise SignatureMissing(f"{name} command is not signed")
    store = as_trust_store(trust)
    try:
        public_key = store.get(kid)
    except RetiredKey:
        raise RetiredKey(f"{name} command is signed by key {kid}, which has been retired") from None
    except UnknownKey:
        trusted = ", ".join(store.key_ids) or "none"
        raise UnknownKey(f"{name} command is signed by key {kid}, which is not trusted (trusted: {trusted})") from None
    try:
        raw = bytes.fromhex(signature)
        public_key.verify(raw, signing_bytes(command))
    except (ValueError, InvalidSignature):
        raise SignatureInvalid(f"{name} command signature does not verify with key {kid}") from None
    expires_at = getattr(command, "expires_at", None)
    if expires_at is not None and expires_at <= (now or datetime.now(UTC)):
        raise CommandExpired(f"{name} command expired at {expires_at.isoformat()}")
    return kid
