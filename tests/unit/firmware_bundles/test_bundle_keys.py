"""Key files, key ids and the trust store (rotation and retirement)."""

from __future__ import annotations

import hashlib
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from firmware_bundles.errors import KeyFileError, RetiredKey, UnknownKey
from firmware_bundles.keys import (
    RETIRED_FILE_NAME,
    TrustStore,
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    save_private_key,
    write_key_pair,
)


def test_key_id_is_first_16_hex_of_sha256_of_raw_public_bytes() -> None:
    key = generate_private_key().public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key) == hashlib.sha256(raw).hexdigest()[:16]
    assert key_id(key) != key_id(generate_private_key().public_key())


def test_write_key_pair_files_modes_and_round_trip(tmp_path) -> None:
    private_path, public_path, kid = write_key_pair(tmp_path / "keys")
    assert private_path.name == "signing-key.pem" and "pub" in public_path.name
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert key_id(load_private_key(private_path).public_key()) == kid
    assert key_id(load_public_key(public_path)) == kid


def test_write_key_pair_refuses_to_overwrite(tmp_path) -> None:
    private_path, _, _ = write_key_pair(tmp_path)
    before = private_path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_pair(tmp_path)
    assert private_path.read_bytes() == before
    write_key_pair(tmp_path, overwrite=True)
    assert private_path.read_bytes() != before


def test_password_protected_private_key(tmp_path) -> None:
    key = generate_private_key()
    save_private_key(key, tmp_path / "k.pem", password=b"s3cret")
    assert key_id(load_private_key(tmp_path / "k.pem", password=b"s3cret").public_key()) == key_id(
        key.public_key()
    )
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "k.pem")


def test_public_loader_refuses_private_keys_and_garbage(tmp_path) -> None:
    private_path, public_path, _ = write_key_pair(tmp_path)
    with pytest.raises(KeyFileError, match="private key"):
        load_public_key(private_path)
    with pytest.raises(KeyFileError, match="private key"):
        load_private_key(public_path)
    (tmp_path / "junk.pub.pem").write_text("not a key")
    with pytest.raises(KeyFileError, match="not a readable PEM"):
        load_public_key(tmp_path / "junk.pub.pem")
    with pytest.raises(KeyFileError, match="not found"):
        load_public_key(tmp_path / "missing.pem")


def test_trust_store_from_directory_loads_only_public_keys_and_retired_ids(tmp_path) -> None:
    _, _, old = write_key_pair(tmp_path, name="old")
    _, _, new = write_key_pair(tmp_path, name="new")
    store = TrustStore.from_path(tmp_path)
    assert store.key_ids == sorted([old, new])
    (tmp_path / RETIRED_FILE_NAME).write_text(f"# rotated 2024-05\n{old}\n")
    store = TrustStore.from_path(tmp_path)
    assert store.key_ids == [new] and old not in store and new in store
    with pytest.raises(RetiredKey, match=old):
        store.get(old)


def test_trust_store_from_single_file_and_explicit_retired(tmp_path) -> None:
    _, public_path, kid = write_key_pair(tmp_path)
    assert TrustStore.from_path(public_path).key_ids == [kid]
    with pytest.raises(RetiredKey):
        TrustStore.from_path(public_path, retired=[kid]).get(kid)


def test_trust_store_unknown_key_names_both_ids(tmp_path) -> None:
    key = generate_private_key().public_key()
    store = TrustStore([key])
    with pytest.raises(UnknownKey) as info:
        store.get("ffffffffffffffff")
    assert "ffffffffffffffff" in str(info.value) and key_id(key) in str(info.value)
    assert store.get(key_id(key)) is key


def test_empty_trust_directory_is_an_error(tmp_path) -> None:
    with pytest.raises(KeyFileError, match="no public keys"):
        TrustStore.from_path(tmp_path)
