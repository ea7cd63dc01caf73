"""Push a signed bundle to an OCI distribution-spec registry as an OCI image, and pull it back.

The image pushed is exactly the one ``oci.export_oci`` writes into an ``oci-archive``
(the push exports to a temporary archive and uploads its blobs, so there is one image
builder); the pull reads the image back through ``oci_extract``'s reader, so the bundle it
writes is byte-identical to the one pushed and goes through the same checks as
``extract_oci``. Every blob is checked against the sha256 and size in the image manifest
while it streams to disk, an interrupted blob download resumes with ``Range``, and a
manifest asked for by digest must hash to that digest. Trust comes only from the bundle's
ed25519 signature: ``pull`` checks it when given ``trust`` (the CLI always does).

References look like ``127.0.0.1:5000/edgeloop/model:7`` or ``host/name@sha256:<hex>``.
Plain HTTP is used for loopback hosts or with ``insecure=True``, HTTPS otherwise. Basic or
bearer-token auth (the ``WWW-Authenticate: Bearer realm=...`` dance) uses
``EDGELOOP_OCI_USERNAME`` / ``EDGELOOP_OCI_PASSWORD`` when set. Needs httpx (the ``edge``
extra).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from firmware_bundles.archive import CHUNK_SIZE, sha256_file
from firmware_bundles.errors import BundleDigestMismatch, BundleError, BundleTooLarge
from firmware_bundles.fsutil import fsync_dir
from firmware_bundles.manifest import BundleManifest
from firmware_bundles.oci import (
    BLOBS_DIR,
    DEFAULT_ARCHITECTURE,
    INDEX_NAME,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    OCI_LAYOUT_BYTES,
    OCI_LAYOUT_NAME,
    REF_NAME,
    OciImage,
    export_oci,
)
from firmware_bundles.oci_extract import (
    MAX_METADATA_BYTES,
    _hex_of,
    _OciArchive,
    _read_image,
    _rebuild_from_layer,
    check_image_labels,
    describe,
    json_object,
)
from firmware_bundles.reader import DEFAULT_MAX_BYTES, BundleReader
from firmware_bundles.verify import Trust, as_trust_store, verify_bundle

MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join(
    (MEDIA_TYPE_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_INDEX, MEDIA_TYPE_DOCKER_LIST)
)
MAX_MANIFEST_BYTES = MAX_METADATA_BYTES  # 4 MiB, the distribution spec's suggested manifest limit
MAX_ERROR_BODY = 64 * 1024
DEFAULT_MAX_BLOB_BYTES = DEFAULT_MAX_BYTES  # 2 GiB
DEFAULT_TIMEOUT = 60.0
# Blobs up to this go in one PUT; bigger ones in PATCHes of this size (some proxies cap bodies).
DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
MAX_RESUMES = 5
USERNAME_ENV, PASSWORD_ENV = "EDGELOOP_OCI_USERNAME", "EDGELOOP_OCI_PASSWORD"

_NAME_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class OciRegistryError(BundleError):
    """A registry refused a request, answered something malformed, or could not be reached.

    ``code`` is the first error code of the registry's JSON error body (``MANIFEST_UNKNOWN``,
    ``BLOB_UNKNOWN``, ``UNAUTHORIZED``...) when it sent one; ``status`` the HTTP status.
    """

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class _Unreachable(OciRegistryError):
    """The request did not get an answer (connection refused, reset, timed out)."""


# -- references -----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """``host[:port]/name[:tag][@sha256:<hex>]``."""

    host: str
    name: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, ref: str) -> ImageRef:
        host, sep, rest = ref.partition("/")
        if not sep or not rest or not _HOST_RE.match(host):
            raise ValueError(f"{ref!r} is not an image reference (HOST[:PORT]/NAME[:TAG][@sha256:DIGEST])")
        digest = None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise ValueError(
                    f"{ref!r} has digest {digest!r}; only sha256:<64 lowercase hex> is supported"
                )
        tag = None
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            rest, tag = rest.rsplit(":", 1)
            if not _TAG_RE.match(tag):
                raise ValueError(f"{tag!r} is not a valid image tag")
        if not _NAME_RE.match(rest):
            raise ValueError(
                f"{rest!r} is not a valid repository name (lowercase, digits, '.', '_', '-', '/')"
            )
        return cls(host=host, name=rest, tag=tag, digest=digest)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        if self.tag is None:
            raise ValueError(f"{self} has neither a tag nor a digest")
        return self.tag

    def __str__(self) -> str:
        text = f"{self.host}/{self.name}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def is_loopback(host: str) -> bool:
    """Whether ``host`` (with or without a port) names this machine."""
    try:
        name = httpx.URL(f"http://{host}/").host
    except httpx.InvalidURL:
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- auth -----------------------------------------------------------------------------


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {key.lower(): value for key, value in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


class RegistryAuth(httpx.Auth):
    """Basic auth, or the bearer-token dance: on a 401 ``Bearer realm=..,service=..,scope=..``
    fetch a token from the realm (with basic credentials when given) and retry once."""

    def __init__(self, username: str | None, password: str | None, *, allow_http_realm: bool = False) -> None:
        self._username, self._password = username, password
        self._allow_http_realm = allow_http_realm
        self._header: str | None = None

    def _basic(self) -> str | None:
        if self._username is None:
            return None
        raw = f"{self._username}:{self._password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._header is not None:
            request.headers["Authorization"] = self._header
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = _parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            header = self._basic()
            if header is None:
                return
        elif scheme == "bearer" and params.get("realm"):
            realm = httpx.URL(params["realm"])
            if realm.scheme != "https" and not (self._allow_http_realm or is_loopback(realm.host)):
                raise OciRegistryError(f"the registry's token realm {realm} is not HTTPS; refusing to use it")
            query = {key: params[key] for key in ("service", "scope") if key in params}
            token_request = httpx.Request("GET", realm.copy_merge_params(query))
            basic = self._basic()
            if basic is not None:
                token_request.headers["Authorization"] = basic
            token_response = yield token_request
            if token_response.status_code != 200:
                raise _error(token_response, f"token request to {realm}")
            try:
                body = json.loads(b"".join(_limited(token_response, MAX_ERROR_BODY)))
                token = body.get("token") or body.get("access_token")
            except (ValueError, AttributeError):
                token = None
            if not isinstance(token, str) or not token:
                raise OciRegistryError(f"the token service {realm} sent no token")
            header = "Bearer " + token
        else:
            return
        self._header = header
        request.headers["Authorization"] = header
        yield request


def auth_from_env(*, allow_http_realm: bool = False) -> RegistryAuth:
    return RegistryAuth(
        os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV), allow_http_realm=allow_http_realm
    )


# -- the client -----------------------------------------------------------------------


def _error(response: httpx.Response, what: str) -> OciRegistryError:
    """An error from a registry response; the body is read up to a limit, its first error code kept."""
    code = message = None
    try:
        raw = (
            response.content if response.is_stream_consumed else b"".join(_limited(response, MAX_ERROR_BODY))
        )
        errors = json.loads(raw).get("errors") if raw else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            code, message = errors[0].get("code"), errors[0].get("message")
    except (ValueError, AttributeError, httpx.HTTPError, OciRegistryError):
        pass
    detail = f"{code}: {message}" if code else f"HTTP {response.status_code}"
    return OciRegistryError(
        f"{what} failed: {detail} (HTTP {response.status_code})" if code else f"{what} failed: {detail}",
        code=code if isinstance(code, str) else None,
        status=response.status_code,
    )


def _limited(response: httpx.Response, limit: int) -> Iterator[bytes]:
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > limit:
            raise OciRegistryError(f"response to {response.request.url} is over the {limit} byte limit")
        yield chunk


class RegistryClient:
    """The distribution-spec calls that push and pull need, for one registry host."""

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        auth: httpx.Auth | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        scheme = "http" if insecure or is_loopback(host) else "https"
        self.base = f"{scheme}://{host}"
        self._client = httpx.Client(
            base_url=self.base,
            auth=auth if auth is not None else auth_from_env(allow_http_realm=insecure),
            timeout=timeout,
            follow_redirects=True,  # blob GETs may redirect to storage; httpx drops auth off-origin
            transport=transport,
            headers={"User-Agent": "edgeloop-oci"},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _request(self, method: str, url: str, what: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            request = self._client.build_request(method, url, **kwargs)
            response = self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _Unreachable(f"{what}: cannot reach {self.base} ({type(exc).__name__}: {exc})") from None
        try:
            yield response
        finally:
            response.close()

    # -- blobs

    def blob_exists(self, name: str, digest: str) -> bool:
        with self._request("HEAD", f"/v2/{name}/blobs/{digest}", f"HEAD blob {digest}") as response:
            if response.status_code == 200:
                return True
            if response.status_code == 404:
                return False
            raise _error(response, f"HEAD blob {digest}")

    def upload_blob(
        self,
        name: str,
        digest: str,
        size: int,
        content: bytes | Iterator[bytes],
        *,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ) -> None:
        """POST an upload session, then PUT the blob with its digest.

        Up to ``chunk_size`` bytes go in the PUT (a monolithic upload); a bigger blob goes in
        ``chunk_size`` PATCHes (``Content-Range``), each in memory, and a PUT with no body
        closes the session. The registry checks the digest either way.
        """
        with self._request("POST", f"/v2/{name}/blobs/uploads/", "start blob upload") as response:
            if response.status_code != 202 or "Location" not in response.headers:
                raise _error(response, f"start upload of {digest}")
            location = response.headers["Location"]
        if chunk_size is not None and size > chunk_size:
            location = self._upload_chunks(digest, location, content, chunk_size)
            content, size = b"", 0
        url = httpx.URL(self.base).join(location).copy_merge_params({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with self._request("PUT", str(url), f"upload {digest}", content=content, headers=headers) as response:
            if response.status_code != 201:
                raise _error(response, f"upload of blob {digest}")

    def _upload_chunks(
        self, digest: str, location: str, content: bytes | Iterator[bytes], chunk_size: int
    ) -> str:
        source = iter([content]) if isinstance(content, bytes) else content
        offset, pending = 0, bytearray()

        def send(data: bytes) -> str:
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(len(data)),
                "Content-Range": f"{offset}-{offset + len(data) - 1}",
            }
            url = str(httpx.URL(self.base).join(location))
            with self._request(
                "PATCH", url, f"upload chunk of {digest}", content=data, headers=headers
            ) as rsp:
                if rsp.status_code != 202 or "Location" not in rsp.headers:
                    raise _error(rsp, f"upload of blob {digest} at byte {offset}")
                return rsp.headers["Location"]

        for piece in source:
            pending += piece
            while len(pending) >= chunk_size:
                location = send(bytes(pending[:chunk_size]))
                offset += chunk_size
                del pending[:chunk_size]
        if pending:
            location = send(bytes(pending))
        return location

    def download_blob(
        self,
        name: str,
        digest: str,
        size: int,
        out: IO[bytes],
        *,
        max_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    ) -> None:
        """Stream a blob into ``out``, checking its size and sha256; resume with ``Range`` when cut off."""
        expected_hex = _hex_of(digest, "blob")
        if size > max_bytes:
            raise BundleTooLarge(f"blob {digest} is {size} bytes, over the limit of {max_bytes} bytes")
        hasher, received, resumes = hashlib.sha256(), 0, 0
        while True:
            # identity: the bytes hashed are the blob's, not a transfer encoding of them.
            headers = {"Accept-Encoding": "identity"}
            if received:
                headers["Range"] = f"bytes={received}-"
            try:
                with self._request(
                    "GET", f"/v2/{name}/blobs/{digest}", f"GET blob {digest}", headers=headers
                ) as rsp:
                    if received and rsp.status_code == 206:
                        match = _CONTENT_RANGE_RE.match(rsp.headers.get("Content-Range", ""))
                        if match is None or int(match.group(1)) != received:
                            raise OciRegistryError(
                                f"blob {digest}: the registry resumed at {rsp.headers.get('Content-Range')!r}, "
                                f"asked for byte {received}"
                            )
                    elif rsp.status_code == 200:
                        if received:  # the registry ignored Range: start over
                            out.seek(0)
                            out.truncate()
                            hasher, received = hashlib.sha256(), 0
                    else:
                        raise _error(rsp, f"GET blob {digest}")
                    if rsp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                        raise OciRegistryError(
                            f"blob {digest}: the registry sent it {rsp.headers['Content-Encoding']}-encoded"
                        )
                    length = rsp.headers.get("Content-Length")
                    if length is not None and length.isdigit() and received + int(length) != size:
                        raise BundleDigestMismatch(
                            f"blob {digest} is {received + int(length)} bytes, the image manifest says {size}"
                        )
                    for chunk in rsp.iter_bytes():  # unbuffered: what arrived counts if cut off
                        received += len(chunk)
                        if received > size:
                            raise BundleDigestMismatch(
                                f"blob {digest} is longer than the {size} bytes its descriptor says"
                            )
                        hasher.update(chunk)
                        out.write(chunk)
            except _Unreachable:
                if resumes >= MAX_RESUMES:
                    raise
                resumes += 1
                time.sleep(0.2 * resumes)
                continue
            except httpx.HTTPError as exc:  # cut off mid-body
                if resumes >= MAX_RESUMES:
                    raise OciRegistryError(
                        f"blob {digest}: download broke off {resumes + 1} times ({type(exc).__name__}: {exc})"
                    ) from None
                resumes += 1
                time.sleep(0.2 * resumes)
                continue
            if received < size:  # ended cleanly, short: resuming would only ask past its end
                raise BundleDigestMismatch(
                    f"blob {digest} is {received} bytes, the image manifest says {size}"
                )
            break
        out.flush()
        if hasher.hexdigest() != expected_hex:
            raise BundleDigestMismatch(
                f"blob has sha256 {hasher.hexdigest()}, the image manifest says {digest}"
            )

    def read_blob(self, name: str, digest: str, size: int) -> bytes:
        """A small blob (config), checked; at most the manifest size limit."""
        if size > MAX_MANIFEST_BYTES:
            raise BundleTooLarge(
                f"blob {digest} is {size} bytes, over the {MAX_MANIFEST_BYTES} byte metadata limit"
            )
        buffer = _Buffer()
        self.download_blob(name, digest, size, buffer, max_bytes=MAX_MANIFEST_BYTES)
        return buffer.getvalue()

    # -- manifests

    def put_manifest(
        self, name: str, reference: str, data: bytes, media_type: str = MEDIA_TYPE_MANIFEST
    ) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self._request(
            "PUT",
            f"/v2/{name}/manifests/{reference}",
            f"PUT manifest {reference}",
            content=data,
            headers={"Content-Type": media_type},
        ) as response:
            if response.status_code != 201:
                raise _error(response, f"PUT manifest {name}:{reference}")
            echoed = response.headers.get("Docker-Content-Digest")
        if echoed is not None and echoed != digest:
            raise OciRegistryError(
                f"the registry stored the manifest as {echoed}, its bytes hash to {digest}"
            )
        return digest

    def get_manifest(self, name: str, reference: str) -> tuple[bytes, str, str]:
        """The manifest's bytes (at most 4 MiB), media type and sha256 digest."""
        with self._request(
            "GET",
            f"/v2/{name}/manifests/{reference}",
            f"GET manifest {reference}",
            headers={"Accept": MANIFEST_ACCEPT},
        ) as response:
            if response.status_code != 200:
                raise _error(response, f"GET manifest {name}:{reference}")
            data = b"".join(_limited(response, MAX_MANIFEST_BYTES))
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise BundleDigestMismatch(f"the registry served a manifest with digest {digest} for {reference}")
        return data, media_type, digest


class _Buffer:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def seek(self, offset: int) -> None:
        assert offset == 0

    def truncate(self) -> None:
        self._parts.clear()

    def flush(self) -> None:
        pass

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


# -- push -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    ref: ImageRef
    manifest_digest: str
    image: OciImage
    uploaded: tuple[str, ...]  # digests of the blobs that were not in the registry yet


def _file_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_SIZE):
        yield chunk


def push(
    bundle_path: str | os.PathLike[str],
    ref: str | ImageRef,
    *,
    insecure: bool = False,
    architecture: str = DEFAULT_ARCHITECTURE,
    trust: Trust | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    auth: httpx.Auth | None = None,
    transport: httpx.BaseTransport | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> PushResult:
    """Push a signed bundle as the OCI image ``export_oci`` builds; the tag defaults to the version.

    With ``trust`` the bundle must verify first (as for ``export_oci``); without, it must be
    intact and signed. Blobs already in the repository are not uploaded again; blobs over
    ``chunk_size`` are uploaded in chunks (``None``: always in one PUT).
    """
    image_ref = ref if isinstance(ref, ImageRef) else ImageRef.parse(ref)
    if image_ref.digest is not None:
        raise ValueError("push to a tag (HOST/NAME:TAG), not a digest: the digest is the pushed image's")
    with tempfile.TemporaryDirectory(prefix="edgeloop-oci-push-") as work:
        archive_path = Path(work) / "image.oci.tar"
        image = export_oci(
            bundle_path,
            archive_path,
            architecture=architecture,
            ref_name=image_ref.tag,
            trust=trust,
            max_bytes=max_bytes,
        )
        tagged = ImageRef(image_ref.host, image_ref.name, image.ref_name)
        uploaded = []
        with (
            contextlib.closing(_OciArchive(archive_path, max_bytes + MAX_MANIFEST_BYTES)) as archive,
            RegistryClient(image_ref.host, insecure=insecure, auth=auth, transport=transport) as client,
        ):
            manifest_bytes = archive.read_small(f"{BLOBS_DIR}/{image.manifest_digest[7:]}")
            manifest = json.loads(manifest_bytes)
            for descriptor, what in [(manifest["config"], "image config"), (manifest["layers"][0], "layer")]:
                digest = descriptor["digest"]
                if client.blob_exists(image_ref.name, digest):
                    continue
                with archive.blob_stream(descriptor, what) as (stream, _, size):
                    client.upload_blob(
                        image_ref.name, digest, size, _file_chunks(stream), chunk_size=chunk_size
                    )
                uploaded.append(digest)
            digest = client.put_manifest(image_ref.name, image.ref_name, manifest_bytes)
    return PushResult(ref=tagged, manifest_digest=digest, image=image, uploaded=tuple(uploaded))


# -- pull -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PullResult:
    ref: ImageRef
    manifest_digest: str
    bundle_path: Path
    bundle_sha256: str
    manifest: BundleManifest
    verified: bool  # the signature was checked against a trust store


class _RegistryImage:
    """What ``oci_extract``'s reader asks of an archive, served from a registry.

    ``oci-layout`` and ``index.json`` are those of a one-image layout; blobs are downloaded
    (checked, resumable) into ``work`` as they are asked for.
    """

    def __init__(
        self, client: RegistryClient, name: str, manifest: bytes, digest: str, work: Path, max_blob_bytes: int
    ) -> None:
        self._client, self._name, self._work, self._max = client, name, work, max_blob_bytes
        self._manifest, self._digest = manifest, digest
        descriptor = {
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": digest,
            "size": len(manifest),
            "annotations": {REF_NAME: "pulled"},
        }
        self._files = {
            OCI_LAYOUT_NAME: OCI_LAYOUT_BYTES,
            INDEX_NAME: json.dumps({"schemaVersion": 2, "manifests": [descriptor]}).encode(),
        }

    def read_json(self, name: str, raw: bytes | None = None) -> dict[str, Any]:
        return json_object(name, self._files[name] if raw is None else raw, OciRegistryError)

    @staticmethod
    def _describe(descriptor: object, what: str) -> tuple[str, int]:
        hex_digest, size = describe(descriptor, what, OciRegistryError)
        return "sha256:" + hex_digest, size

    def blob_json(self, descriptor: object, what: str) -> dict[str, Any]:
        digest, size = self._describe(descriptor, what)
        if digest == self._digest:
            return self.read_json("image manifest", self._manifest)
        return self.read_json(what, self._client.read_blob(self._name, digest, size))

    @contextlib.contextmanager
    def blob_stream(self, descriptor: object, what: str) -> Iterator[tuple[IO[bytes], str, int]]:
        digest, size = self._describe(descriptor, what)
        path = self._work / f"blob-{digest[7:]}"
        with open(path, "w+b") as handle:
            self._client.download_blob(self._name, digest, size, handle, max_bytes=self._max)
            handle.seek(0)
            yield handle, digest[7:], size


def pull(
    ref: str | ImageRef,
    out_path: str | os.PathLike[str],
    *,
    trust: Trust | None = None,
    insecure: bool = False,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    auth: httpx.Auth | None = None,
    transport: httpx.BaseTransport | None = None,
) -> PullResult:
    """Pull the bundle image at ``ref`` and write the signed bundle to ``out_path`` (atomically).

    Checks the manifest digest (when ``ref`` has one), every blob's size and sha256, the
    layer's diff_id, the bundle's files against its manifest, and that the image's labels
    agree with the bundle; the ed25519 signature only when ``trust`` is given.
    """
    image_ref = ref if isinstance(ref, ImageRef) else ImageRef.parse(ref)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=".oci-pull-"))
    try:
        with RegistryClient(image_ref.host, insecure=insecure, auth=auth, transport=transport) as client:
            data, media_type, digest = client.get_manifest(image_ref.name, image_ref.reference)
            if media_type in (MEDIA_TYPE_INDEX, MEDIA_TYPE_DOCKER_LIST):
                raise OciRegistryError(f"{image_ref} is an image index ({media_type}), not one bundle image")
            if media_type not in (MEDIA_TYPE_MANIFEST, ""):
                raise OciRegistryError(
                    f"{image_ref} is a {media_type!r} manifest; a bundle image is an OCI image manifest"
                )
            source = _RegistryImage(client, image_ref.name, data, digest, work, max_blob_bytes)
            image = _read_image(source, None)  # type: ignore[arg-type]
            bundle = _rebuild_from_layer(source, image, work, max_blob_bytes)  # type: ignore[arg-type]
        if trust is not None:
            manifest = verify_bundle(bundle, as_trust_store(trust), max_bytes=max_blob_bytes)
        else:
            with BundleReader(bundle, max_bytes=max_blob_bytes) as reader:
                manifest, _ = reader.read_manifest()
                reader.check_files(manifest)
                reader.check_no_extras(manifest)
        bundle_sha256 = sha256_file(bundle)
        check_image_labels(image, manifest, bundle_sha256)
        os.replace(bundle, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PullResult(
        ref=image_ref,
        manifest_digest=digest,
        bundle_path=out,
        bundle_sha256=bundle_sha256,
        manifest=manifest,
        verified=trust is not None,
    )


__all__ = [
    "ImageRef",
    "OciRegistryError",
    "PullResult",
    "PushResult",
    "RegistryAuth",
    "RegistryClient",
    "pull",
    "push",
]
