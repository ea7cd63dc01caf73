"""Signed commands: a rollback command signed with a bundle key verifies after the MQTT round trip;
unsigned, foreign-key, retired-key, edited, re-targeted and expired commands are refused with a reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from firmware_bundles import (
    RetiredKey,
    SignatureInvalid,
    SignatureMissing,
    TrustStore,
    UnknownKey,
    generate_private_key,
    key_id,
)
from firmware_bundles.commands import CommandExpired, sign_command, signing_bytes, verify_command
from protocol import decode_message, device_topic, encode_message
from protocol.messages import RollbackCommand
from protocol.topics import Channel

DEVICE = "cam-7"


@pytest.fixture
def key():
    return generate_private_key()


@pytest.fixture
def trust(key):
    return TrustStore([key.public_key()])


def _command(**kw) -> RollbackCommand:
    fields = {"device_id": DEVICE, "to_version": 3, "reason": "wave 2 failed its gates",
              "expires_at": datetime.now(UTC) + timedelta(hours=1)}
    return RollbackCommand(**(fields | kw))


def _over_the_wire(command: RollbackCommand) -> RollbackCommand:
    topic = device_topic(command.device_id, Channel.COMMANDS)
    return decode_message(topic, encode_message(command))


def test_signed_command_verifies_after_encoding_and_decoding(key, trust) -> None:
    signed = sign_command(_command(bundle_url="http://store/b3.tar", bundle_sha256="ab" * 32, bundle_size=100), key)
    assert signed.key_id == key_id(key.public_key()) and len(signed.signature) == 128
    received = _over_the_wire(signed)
    assert verify_command(received, trust) == signed.key_id


def test_signature_covers_everything_but_itself(key) -> None:
    signed = sign_command(_command(), key)
    assert b'"signature"' not in signing_bytes(signed)
    assert b'"to_version":3' in signing_bytes(signed) and b'"device_id":"cam-7"' in signing_bytes(signed)


def test_unsigned_command_is_refused(trust) -> None:
    with pytest.raises(SignatureMissing, match="rollback command is not signed"):
        verify_command(_over_the_wire(_command()), trust)


def test_command_signed_by_an_unknown_key_is_refused(trust) -> None:
    other = generate_private_key()
    with pytest.raises(UnknownKey, match=f"signed by key {key_id(other.public_key())}, which is not trusted"):
        verify_command(_over_the_wire(sign_command(_command(), other)), trust)


def test_command_signed_by_a_retired_key_is_refused(key, trust) -> None:
    trust.retire(key_id(key.public_key()))
    with pytest.raises(RetiredKey, match="has been retired"):
        verify_command(sign_command(_command(), key), trust)


@pytest.mark.parametrize(
    "change",
    [{"to_version": 1}, {"device_id": "cam-8"}, {"reason": "x"}, {"bundle_url": "http://evil/b.tar",
     "bundle_sha256": "cd" * 32, "bundle_size": 5}, {"expires_at": datetime.now(UTC) + timedelta(days=300)}],
    ids=["target", "device", "reason", "bundle", "expiry"],
)
def test_edited_command_is_refused(key, trust, change) -> None:
    signed = sign_command(_command(), key)
    edited = RollbackCommand.model_validate(signed.model_dump() | change)
    with pytest.raises(SignatureInvalid, match="rollback command signature does not verify"):
        verify_command(edited, trust)


def test_signature_swapped_from_another_command_is_refused(key, trust) -> None:
    one, two = sign_command(_command(), key), sign_command(_command(to_version=1), key)
    with pytest.raises(SignatureInvalid):
        verify_command(one.model_copy(update={"signature": two.signature}), trust)


def test_expired_command_is_refused(key, trust) -> None:
    signed = sign_command(_command(expires_at=datetime(2024, 1, 1, tzinfo=UTC)), key)
    with pytest.raises(CommandExpired, match="rollback command expired at 2024-01-01T00:00:00"):
        verify_command(signed, trust)
    # The same command was valid before its expiry.
    assert verify_command(signed, trust, now=datetime(2023, 12, 31, tzinfo=UTC))


def test_command_without_expiry_does_not_expire(key, trust) -> None:
    assert verify_command(sign_command(_command(expires_at=None), key), trust)


def test_partial_bundle_fields_are_invalid() -> None:
    with pytest.raises(ValueError, match="go together"):
        _command(bundle_url="http://store/b.tar")
    with pytest.raises(ValueError, match="needs to_version"):
        _command(to_version=None, bundle_url="http://store/b.tar", bundle_sha256="ab" * 32, bundle_size=1)
