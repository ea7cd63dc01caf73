"""The OCI registry client without a registry: references, scheme, auth dance, errors, limits, resume.

The real-registry round trip is in tests/integration/test_oci_registry.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json

import httpx
import pytest

from firmware_bundles import BundleDigestMismatch, BundleTooLarge
from firmware_bundles.oci_registry import (
    MAX_MANIFEST_BYTES,
    ImageRef,
    OciRegistryError,
    RegistryAuth,
    RegistryClient,
    is_loopback,
)

BLOB = bytes(range(256)) * 64
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def test_refs_parse_and_reject() -> None:
    ref = ImageRef.parse("127.0.0.1:5000/edgeloop/model:7")
    assert (ref.host, ref.name, ref.tag, ref.digest, ref.reference) == (
        "127.0.0.1:5000",
        "edgeloop/model",
        "7",
        None,
        "7",
    )
    pinned = ImageRef.parse(f"reg.example.com/edgeloop/model:7@sha256:{'a' * 64}")
    assert pinned.reference == f"sha256:{'a' * 64}" and pinned.tag == "7"
    assert str(pinned) == f"reg.example.com/edgeloop/model:7@sha256:{'a' * 64}"
    assert ImageRef.parse("localhost:5000/model").tag is None
    for bad in [
        "model:7",
        "host/Model:7",
        "host/model:bad/tag",
        "host/model@sha256:abc",
        "host/model@md5:" + "a" * 32,
        "host/model:" + "x" * 200,
        "/model:7",
        "ho st/model:1",
    ]:
        with pytest.raises(ValueError):
            ImageRef.parse(bad)
    with pytest.raises(ValueError, match="neither a tag nor a digest"):
        _ = ImageRef.parse("localhost:5000/model").reference


def test_plain_http_only_for_loopback_or_insecure() -> None:
    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost") and is_loopback("[::1]:5000")
    assert not is_loopback("10.0.0.1:5000") and not is_loopback("registry.example.com")
    assert RegistryClient("127.0.0.1:5000").base == "http://127.0.0.1:5000"
    assert RegistryClient("registry.example.com").base == "https://registry.example.com"
    assert RegistryClient("10.0.0.1:5000", insecure=True).base == "http://10.0.0.1:5000"


def _client(handler, **kwargs) -> RegistryClient:
    return RegistryClient("registry.example.com", transport=httpx.MockTransport(handler), **kwargs)


def test_bearer_token_dance_with_basic_credentials() -> None:
    calls: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((str(request.url), request.headers.get("Authorization")))
        if request.url.host == "auth.example.com":
            expected = "Basic " + base64.b64encode(b"ci:s3cret").decode()
            assert request.headers.get("Authorization") == expected
            assert request.url.params["service"] == "registry.example.com"
            assert request.url.params["scope"] == "repository:edgeloop/model:pull"
            return httpx.Response(200, json={"token": "tok-1"})
        if request.headers.get("Authorization") != "Bearer tok-1":
            return httpx.Response(
                401,
                headers={
                    "WWW-Authenticate": 'Bearer realm="https://auth.example.com/token",'
                    'service="registry.example.com",scope="repository:edgeloop/model:pull"'
                },
                json={"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            )
        return httpx.Response(200, headers={"Content-Length": str(len(BLOB))})

    with _client(handler, auth=RegistryAuth("ci", "s3cret")) as client:
        assert client.blob_exists("edgeloop/model", BLOB_DIGEST)
        assert client.blob_exists("edgeloop/model", BLOB_DIGEST)  # the token is kept
    assert [c[0].split("?")[0] for c in calls] == [
        f"https://registry.example.com/v2/edgeloop/model/blobs/{BLOB_DIGEST}",
        "https://auth.example.com/token",
        f"https://registry.example.com/v2/edgeloop/model/blobs/{BLOB_DIGEST}",
        f"https://registry.example.com/v2/edgeloop/model/blobs/{BLOB_DIGEST}",
    ]
    assert calls[-1][1] == "Bearer tok-1"


def test_basic_challenge_and_env_credentials(monkeypatch) -> None:
    monkeypatch.setenv("EDGELOOP_OCI_USERNAME", "ci")
    monkeypatch.setenv("EDGELOOP_OCI_PASSWORD", "pw")
    expected = "Basic " + base64.b64encode(b"ci:pw").decode()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") != expected:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})
        return httpx.Response(404)

    with _client(handler) as client:
        assert client.blob_exists("m", BLOB_DIGEST) is False


def test_http_token_realm_is_refused_off_loopback() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="http://auth.example.com/token"'}
        )

    with (
        _client(handler, auth=RegistryAuth("u", "p")) as client,
        pytest.raises(OciRegistryError, match="not HTTPS"),
    ):
        client.blob_exists("m", BLOB_DIGEST)


def test_registry_error_code_is_kept() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
        )

    with _client(handler) as client, pytest.raises(OciRegistryError, match="MANIFEST_UNKNOWN") as err:
        client.get_manifest("m", "7")
    assert (err.value.code, err.value.status) == ("MANIFEST_UNKNOWN", 404)


def test_unreachable_registry_is_a_registry_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with _client(handler) as client, pytest.raises(OciRegistryError, match="cannot reach"):
        client.get_manifest("m", "7")


def test_manifest_size_limit_and_digest_check() -> None:
    big = b"{" + b" " * MAX_MANIFEST_BYTES + b"}"

    def handler(request: httpx.Request) -> httpx.Response:
        body = big if request.url.path.endswith("/big") else b'{"schemaVersion":2}'
        return httpx.Response(
            200, content=body, headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        )

    with _client(handler) as client:
        with pytest.raises(OciRegistryError, match="byte limit"):
            client.get_manifest("m", "big")
        data, media_type, digest = client.get_manifest("m", "7")
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        with pytest.raises(BundleDigestMismatch, match="served a manifest with digest"):
            client.get_manifest("m", "sha256:" + "0" * 64)


def test_blob_limits_and_checks() -> None:
    served = {"body": BLOB}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=served["body"])

    with _client(handler) as client:
        with pytest.raises(BundleTooLarge):
            client.download_blob("m", BLOB_DIGEST, len(BLOB), io.BytesIO(), max_bytes=len(BLOB) - 1)
        out = io.BytesIO()
        client.download_blob("m", BLOB_DIGEST, len(BLOB), out)
        assert out.getvalue() == BLOB
        served["body"] = BLOB[:-1] + b"\x00"
        with pytest.raises(BundleDigestMismatch, match="blob has sha256"):
            client.download_blob("m", BLOB_DIGEST, len(BLOB), io.BytesIO())
        served["body"] = BLOB + b"x"
        with pytest.raises(BundleDigestMismatch, match="bytes"):
            client.download_blob("m", BLOB_DIGEST, len(BLOB), io.BytesIO())


class _CutStream(httpx.SyncByteStream):
    def __init__(self, data: bytes) -> None:
        self._data = data

    def __iter__(self):
        yield self._data
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def test_resume_when_the_registry_ignores_range_starts_over() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Range"))
        if len(seen) == 1:
            return httpx.Response(
                200, headers={"Content-Length": str(len(BLOB))}, stream=_CutStream(BLOB[:1000])
            )
        return httpx.Response(200, content=BLOB)  # ignores Range: a full body again

    out = io.BytesIO()
    with _client(handler) as client:
        client.download_blob("m", BLOB_DIGEST, len(BLOB), out)
    assert seen == [None, "bytes=1000-"]
    assert out.getvalue() == BLOB


def test_resume_at_the_wrong_offset_is_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if "Range" not in request.headers:
            return httpx.Response(
                200, headers={"Content-Length": str(len(BLOB))}, stream=_CutStream(BLOB[:1000])
            )
        return httpx.Response(
            206, content=BLOB[10:], headers={"Content-Range": f"bytes 10-{len(BLOB) - 1}/{len(BLOB)}"}
        )

    with _client(handler) as client, pytest.raises(OciRegistryError, match="resumed at"):
        client.download_blob("m", BLOB_DIGEST, len(BLOB), io.BytesIO())


def test_endless_cuts_give_up(monkeypatch) -> None:
    monkeypatch.setattr("firmware_bundles.oci_registry.time.sleep", lambda _s: None)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(len(BLOB))}, stream=_CutStream(b""))

    with _client(handler) as client, pytest.raises(OciRegistryError, match="broke off"):
        client.download_blob("m", BLOB_DIGEST, len(BLOB), io.BytesIO())


def test_upload_is_post_then_put_with_digest() -> None:
    calls: list[tuple[str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, str(request.url), request.read()))
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/m/blobs/uploads/abc?_state=xyz"})
        if request.method == "PUT" and "/blobs/uploads/" in request.url.path:
            return httpx.Response(201)
        manifest_digest = "sha256:" + hashlib.sha256(request.content).hexdigest()
        return httpx.Response(201, headers={"Docker-Content-Digest": manifest_digest})

    with _client(handler) as client:
        client.upload_blob("m", BLOB_DIGEST, len(BLOB), BLOB)
        manifest = json.dumps({"schemaVersion": 2}).encode()
        assert client.put_manifest("m", "7", manifest) == "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert calls[0][:2] == ("POST", "https://registry.example.com/v2/m/blobs/uploads/")
    put_url = httpx.URL(calls[1][1])
    assert put_url.path == "/v2/m/blobs/uploads/abc"
    assert put_url.params["_state"] == "xyz" and put_url.params["digest"] == BLOB_DIGEST
    assert calls[1][2] == BLOB


def test_a_registry_that_stores_another_manifest_digest_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, headers={"Docker-Content-Digest": "sha256:" + "1" * 64})

    with _client(handler) as client, pytest.raises(OciRegistryError, match="stored the manifest as"):
        client.put_manifest("m", "7", b"{}")
