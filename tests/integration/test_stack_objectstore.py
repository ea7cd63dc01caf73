"""ObjectStore against the embedded SeaweedFS S3 gateway (real process, real signatures)."""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from server.objectstore import (
    AccessDeniedError,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    ObjectTooLargeError,
)
from server.stack.ports import find_free_port

pytestmark = pytest.mark.integration


def _key(prefix: str = "t") -> str:
    return f"{prefix}/{uuid.uuid4().hex}.bin"


def test_put_get_stat_exists_list_delete(s3_store: ObjectStore):
    prefix = f"list-{uuid.uuid4().hex[:8]}"
    key = f"{prefix}/a/frame.jpg"
    data = os.urandom(50_000)
    etag = s3_store.put_bytes(key, data, "image/jpeg")
    assert s3_store.get_bytes(key, max_bytes=len(data)) == data
    size, stat_etag = s3_store.stat(key)
    assert size == len(data)
    assert stat_etag == etag.strip('"')
    assert s3_store.exists(key)

    s3_store.put_bytes(f"{prefix}/b.json", b"{}", "application/json")
    listed = s3_store.list(prefix + "/")
    assert [info.key for info in listed] == [f"{prefix}/a/frame.jpg", f"{prefix}/b.json"]
    assert listed[0].size == len(data)

    s3_store.delete(key)
    assert s3_store.stat(key) is None
    assert not s3_store.exists(key)


def test_put_file_and_download_file(s3_store: ObjectStore, tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(os.urandom(300_000))
    key = _key("models")
    s3_store.put_file(key, src)
    dest = tmp_path / "out" / "model.onnx"
    assert s3_store.download_file(key, dest) == src.stat().st_size
    assert dest.read_bytes() == src.read_bytes()
    # a refused download leaves nothing behind
    with pytest.raises(ObjectTooLargeError):
        s3_store.download_file(key, tmp_path / "small" / "x", max_bytes=1000)
    assert list((tmp_path / "small").iterdir()) == []


def test_stat_of_missing_key_is_none_and_get_raises(s3_store: ObjectStore):
    key = _key("missing")
    assert s3_store.stat(key) is None
    with pytest.raises(ObjectNotFoundError):
        s3_store.get_bytes(key, max_bytes=10)


def test_get_bytes_size_limit(s3_store: ObjectStore):
    key = _key("limit")
    s3_store.put_bytes(key, b"x" * 1001)
    assert len(s3_store.get_bytes(key, max_bytes=1001)) == 1001
    with pytest.raises(ObjectTooLargeError, match="1001 bytes"):
        s3_store.get_bytes(key, max_bytes=1000)


def test_presigned_put_then_get(s3_store: ObjectStore):
    key = _key("images")
    data = os.urandom(20_000)
    put_url = s3_store.presigned_put(key, timedelta(minutes=5))
    resp = httpx.put(put_url, content=data, headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 200, resp.text
    assert s3_store.stat(key)[0] == len(data)

    get_url = s3_store.presigned_get(key, timedelta(minutes=5))
    got = httpx.get(get_url)
    assert got.status_code == 200
    assert hashlib.sha256(got.content).digest() == hashlib.sha256(data).digest()
    # ranged GET (resumable downloads)
    part = httpx.get(get_url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == data[100:200]


def _tamper(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_tampered_presigned_urls_are_refused(s3_store: ObjectStore):
    key = _key("images")
    s3_store.put_bytes(key, b"original")
    get_url = s3_store.presigned_get(key, timedelta(minutes=5))

    longer = _tamper(get_url, **{"X-Amz-Expires": "604800"})
    assert httpx.get(longer).status_code == 403
    sig = dict(parse_qsl(urlsplit(get_url).query))["X-Amz-Signature"]
    flipped = _tamper(get_url, **{"X-Amz-Signature": ("0" if sig[0] != "0" else "1") + sig[1:]})
    assert httpx.get(flipped).status_code == 403
    other_key = get_url.replace(key, _key("images"))
    assert httpx.get(other_key).status_code == 403

    # a PUT URL for one key cannot write another
    put_url = s3_store.presigned_put(key, timedelta(minutes=5))
    victim = _key("images")
    assert httpx.put(put_url.replace(key, victim), content=b"evil").status_code == 403
    assert s3_store.stat(victim) is None
    assert s3_store.get_bytes(key, 100) == b"original"


def test_wrong_secret_is_refused(seaweedfs, s3_store: ObjectStore):
    bad = ObjectStore(
        seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key[:-1] + "x", bucket=s3_store.bucket
    )
    with pytest.raises(AccessDeniedError):
        bad.put_bytes(_key("denied"), b"nope")
    with pytest.raises(AccessDeniedError):
        bad.stat(_key("denied"))
    # a URL presigned with the wrong secret is refused too
    key = _key("denied")
    assert httpx.put(bad.presigned_put(key, timedelta(minutes=1)), content=b"x").status_code == 403
    assert s3_store.stat(key) is None


def test_unreachable_store_is_a_clear_error():
    port = find_free_port()
    store = ObjectStore(f"127.0.0.1:{port}", "AK", "SK", retries=0, connect_timeout=1)
    with pytest.raises(
        ObjectStoreError, match=f"unreachable.*127.0.0.1:{port}|127.0.0.1:{port}.*unreachable"
    ):
        store.stat("some/key")
    with pytest.raises(ObjectStoreError, match="unreachable"):
        store.ensure_bucket()


def test_invalid_keys_and_expiry_are_refused(s3_store: ObjectStore):
    for bad in ["", "/abs", "a/../b", "a//b", "dir/"]:
        with pytest.raises(ValueError):
            s3_store.put_bytes(bad, b"x")
    with pytest.raises(ValueError):
        s3_store.presigned_get("a/b", timedelta(days=8))
