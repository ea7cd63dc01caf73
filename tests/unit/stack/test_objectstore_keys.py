"""ObjectStore argument checks that need no store."""

from __future__ import annotations

from datetime import timedelta

import pytest

from server.objectstore import ObjectStore, _check_expiry, _check_key


@pytest.mark.parametrize("key", ["images/dev-1/ab/abcdef.jpg", "a", "models/v1/model.onnx", "x/.hidden"])
def test_good_keys(key):
    assert _check_key(key) == key


@pytest.mark.parametrize(
    "key", ["", "/abs", "a/../b", "../a", "a//b", "./a", "dir/", "a\\b", "a\0b", "a/..", "k" * 1025]
)
def test_bad_keys(key):
    with pytest.raises(ValueError):
        _check_key(key)


def test_expiry_bounds():
    assert _check_expiry(timedelta(minutes=15))
    for bad in (timedelta(0), timedelta(days=8), 3600):
        with pytest.raises(ValueError):
            _check_expiry(bad)


def test_endpoint_without_scheme():
    with pytest.raises(ValueError, match="scheme"):
        ObjectStore("http://127.0.0.1:9000", "AK", "SK")
    store = ObjectStore("127.0.0.1:9000", "AK", "SK", bucket="b")
    assert store.bucket == "b" and "127.0.0.1:9000" in repr(store)


def test_presigned_urls_need_no_network_and_use_the_public_endpoint():
    # Nothing listens on port 1: presigning is local when the region is known.
    store = ObjectStore("127.0.0.1:1", "AK", "SK", public_endpoint="edge.example:9000", public_secure=True)
    url = store.presigned_put("images/dev-1/x.jpg", timedelta(minutes=5))
    assert url.startswith("https://edge.example:9000/edgeloop/images/dev-1/x.jpg?")
    assert "X-Amz-Signature=" in url
    assert (
        ObjectStore("127.0.0.1:1", "AK", "SK")
        .presigned_get("a/b", timedelta(minutes=1))
        .startswith("http://127.0.0.1:1/edgeloop/a/b?")
    )
