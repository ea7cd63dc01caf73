"""The object store: one S3 bucket reached through the ``minio`` SDK.

Frames uploaded by devices (``images/``), dataset snapshots, models and firmware
bundles live here. Devices never get keys: the server hands them presigned URLs, so
the server stays out of the data path.

Nothing here reads settings: build an :class:`ObjectStore` from explicit arguments
(the settings factory does that). Every failure surfaces as :class:`ObjectStoreError`
(or a subclass) naming the endpoint and bucket, never as a raw SDK / urllib3 error.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from firmware_bundles.fsutil import atomic_output

DEFAULT_BUCKET = "edgeloop"
DEFAULT_REGION = "us-east-1"
MIN_PRESIGN = timedelta(seconds=1)
MAX_PRESIGN = timedelta(days=7)  # the SigV4 maximum
_CHUNK = 256 * 1024
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}
_DENIED_CODES = {
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
}

T = TypeVar("T")


class ObjectStoreError(RuntimeError):
    """The object store could not do what was asked (unreachable, refused, failed)."""

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.code = code


class ObjectNotFoundError(ObjectStoreError):
    """The key (or bucket) does not exist."""


class ObjectTooLargeError(ObjectStoreError):
    """The object is larger than the caller allowed."""


class AccessDeniedError(ObjectStoreError):
    """The store refused the credentials or the request."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


def _check_key(key: str) -> str:
    """Refuse keys that are empty, absolute or that climb out of their prefix."""
    if not isinstance(key, str) or not key or len(key.encode()) > 1024:
        raise ValueError(f"invalid object key {key!r}: must be 1-1024 bytes")
    if (
        key.startswith("/")
        or "\\" in key
        or "\0" in key
        or any(part in ("", ".", "..") for part in key.split("/")[:-1])
    ):
        raise ValueError(
            f"invalid object key {key!r}: no leading '/', empty, '.' or '..' segments, backslashes"
        )
    if key.split("/")[-1] in ("", ".", ".."):
        raise ValueError(f"invalid object key {key!r}: must name an object, not a folder")
    return key


def _check_expiry(expires: timedelta) -> timedelta:
    if not isinstance(expires, timedelta) or not (MIN_PRESIGN <= expires <= MAX_PRESIGN):
        raise ValueError(
            f"presigned URL lifetime must be a timedelta between {MIN_PRESIGN} and {MAX_PRESIGN}"
        )
    return expires


class ObjectStore:
    """One bucket of an S3-compatible store (MinIO, SeaweedFS, AWS S3...).

    ``endpoint`` is ``host:port`` (no scheme). ``public_endpoint``, when given, is the
    ``host:port`` devices reach the store at: presigned URLs are signed for it (the
    host is part of the signature), while the server talks to ``endpoint``.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        bucket: str = DEFAULT_BUCKET,
        secure: bool = False,
        region: str = DEFAULT_REGION,
        public_endpoint: str | None = None,
        public_secure: bool | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retries: int = 2,
    ):
        if "://" in endpoint:
            raise ValueError(f"endpoint {endpoint!r} must be host:port without a scheme (use secure=...)")
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        self.region = region
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=16,
            retries=urllib3.Retry(
                total=retries, connect=retries, read=0, backoff_factor=0.2, status_forcelist=[502, 503, 504]
            ),
        )
        # region given: the SDK never asks the store for a bucket's location.
        self._client = Minio(
            endpoint=endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=self._http,
        )
        if public_endpoint and public_endpoint != endpoint:
            self._presigner = Minio(
                endpoint=public_endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure if public_secure is None else public_secure,
                region=region,
                http_client=self._http,
            )
        else:
            self._presigner = self._client

    def __repr__(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"ObjectStore({scheme}://{self.endpoint}/{self.bucket})"

    # -- error mapping ---------------------------------------------------------------

    def _where(self, key: str | None = None) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.endpoint}/{self.bucket}" + (f"/{key}" if key else "")

    def _call(self, what: str, fn: Callable[[], T], key: str | None = None) -> T:
        try:
            return fn()
        except ObjectStoreError:
            raise
        except S3Error as exc:
            where = self._where(key)
            if exc.code in _MISSING_CODES or exc.code == "NoSuchBucket":
                raise ObjectNotFoundError(
                    f"{what}: {where} does not exist ({exc.code})", code=exc.code
                ) from None
            if exc.code in _DENIED_CODES:
                raise AccessDeniedError(
                    f"{what}: {where} refused the credentials or request ({exc.code}: {exc.message})",
                    code=exc.code,
                ) from None
            raise ObjectStoreError(
                f"{what}: {where} failed ({exc.code}: {exc.message})", code=exc.code
            ) from None
        except (ServerError, InvalidResponseError) as exc:
            raise ObjectStoreError(f"{what}: {self._where(key)} answered with an error: {exc}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ObjectStoreError(
                f"{what}: object store at {self._where()} is unreachable ({type(reason).__name__}: {reason})"
            ) from None
        except MinioException as exc:
            raise ObjectStoreError(f"{what}: {self._where(key)}: {exc}") from None

    # -- bucket ----------------------------------------------------------------------

    def ensure_bucket(self, name: str | None = None) -> bool:
        """Create the bucket (default: the configured one) if missing; True if it was created."""
        bucket = name or self.bucket

        def run() -> bool:
            if self._client.bucket_exists(bucket):
                return False
            try:
                self._client.make_bucket(bucket)
            except S3Error as exc:
                if exc.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return False
                raise
            return True

        return self._call(f"ensure bucket {bucket!r}", run)

    def ping(self) -> None:
        """Raise :class:`ObjectStoreError` unless the store answers and the bucket exists."""
        exists = self._call("check bucket", lambda: self._client.bucket_exists(self.bucket))
        if not exists:
            raise ObjectNotFoundError(f"bucket {self._where()} does not exist", code="NoSuchBucket")

    # -- writes ----------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Store ``data`` under ``key``; returns the ETag."""
        _check_key(key)
        data = bytes(data)
        result = self._call(
            "put",
            lambda: self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            ),
            key,
        )
        return result.etag

    def put_file(
        self, key: str, path: str | os.PathLike, content_type: str = "application/octet-stream"
    ) -> str:
        """Upload a file (multipart when large); returns the ETag."""
        _check_key(key)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)
        result = self._call(
            "put file",
            lambda: self._client.fput_object(self.bucket, key, str(path), content_type=content_type),
            key,
        )
        return result.etag

    def delete(self, key: str) -> None:
        """Delete ``key`` (no error when it is already gone)."""
        _check_key(key)
        self._call("delete", lambda: self._client.remove_object(self.bucket, key), key)

    # -- reads -----------------------------------------------------------------------

    def stat(self, key: str) -> tuple[int, str] | None:
        """``(size, etag)`` of ``key``, or None when it does not exist."""
        _check_key(key)
        try:
            info = self._call("stat", lambda: self._client.stat_object(self.bucket, key), key)
        except ObjectNotFoundError as exc:
            if exc.code == "NoSuchBucket":
                raise
            return None
        return int(info.size or 0), (info.etag or "").strip('"')

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    @contextlib.contextmanager
    def _open(self, key: str, max_bytes: int | None) -> Iterator[Iterator[bytes]]:
        response = self._call("get", lambda: self._client.get_object(self.bucket, key), key)
        try:
            length = response.headers.get("Content-Length")
            if max_bytes is not None and length is not None and int(length) > max_bytes:
                raise ObjectTooLargeError(
                    f"{self._where(key)} is {int(length)} bytes, more than the {max_bytes} allowed"
                )

            def chunks() -> Iterator[bytes]:
                total = 0
                for chunk in response.stream(_CHUNK):
                    total += len(chunk)
                    if max_bytes is not None and total > max_bytes:
                        raise ObjectTooLargeError(
                            f"{self._where(key)} is more than the {max_bytes} bytes allowed"
                        )
                    yield chunk

            yield self._guard_iter(chunks(), key)
        finally:
            response.close()
            response.release_conn()

    def _guard_iter(self, it: Iterator[bytes], key: str) -> Iterator[bytes]:
        while True:
            try:
                chunk = self._call("read", lambda: next(it), key)
            except StopIteration:
                return
            yield chunk

    def get_bytes(self, key: str, max_bytes: int) -> bytes:
        """The object's content; refuses (:class:`ObjectTooLargeError`) anything larger
        than ``max_bytes`` without reading past the limit. Missing key:
        :class:`ObjectNotFoundError`."""
        _check_key(key)
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        buf = bytearray()
        with self._open(key, max_bytes) as chunks:
            for chunk in chunks:
                buf += chunk
        return bytes(buf)

    def download_file(self, key: str, path: str | os.PathLike, *, max_bytes: int | None = None) -> int:
        """Download to ``path`` atomically (temp file in the same folder, fsync, rename);
        returns the size. Nothing is left at ``path`` on failure."""
        _check_key(key)
        size = 0
        with atomic_output(path) as fh, self._open(key, max_bytes) as chunks:
            for chunk in chunks:
                fh.write(chunk)
                size += len(chunk)
        return size

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (recursive), sorted by key."""

        def run() -> list[ObjectInfo]:
            return [
                ObjectInfo(key=obj.object_name, size=int(obj.size or 0), etag=(obj.etag or "").strip('"'))
                for obj in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
                if not obj.is_dir
            ]

        return sorted(self._call("list", run), key=lambda info: info.key)

    # -- presigned URLs --------------------------------------------------------------

    def presigned_put(self, key: str, expires: timedelta = timedelta(minutes=15)) -> str:
        """A URL that lets its holder PUT ``key`` (only that key) until it expires."""
        _check_key(key)
        _check_expiry(expires)
        return self._call(
            "presign put", lambda: self._presigner.presigned_put_object(self.bucket, key, expires), key
        )

    def presigned_get(self, key: str, expires: timedelta = timedelta(minutes=15)) -> str:
        """A URL that lets its holder GET ``key`` until it expires (ranged GETs work)."""
        _check_key(key)
        _check_expiry(expires)
        return self._call(
            "presign get", lambda: self._presigner.presigned_get_object(self.bucket, key, expires), key
        )
