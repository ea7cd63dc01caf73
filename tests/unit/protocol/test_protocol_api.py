"""HTTP payloads between agent and server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol.api import API_PREFIX, MAX_SAMPLE_BYTES, UploadRequest, upload_path


def test_upload_request_accepts_a_valid_request() -> None:
    req = UploadRequest(sha256="0f" * 32, size_bytes=MAX_SAMPLE_BYTES)
    assert req.content_type == "image/jpeg"
    assert UploadRequest.model_validate_json(req.model_dump_json()) == req


@pytest.mark.parametrize(
    "fields",
    [
        {"sha256": "0F" * 32, "size_bytes": 1},
        {"sha256": "0f" * 31, "size_bytes": 1},
        {"sha256": "0f" * 32, "size_bytes": 0},
        {"sha256": "0f" * 32, "size_bytes": MAX_SAMPLE_BYTES + 1},
        {"sha256": "0f" * 32, "size_bytes": 1, "content_type": "image/gif"},
        {"sha256": "0f" * 32, "size_bytes": 1, "extra": True},
    ],
)
def test_upload_request_refuses_bad_fields(fields: dict) -> None:
    with pytest.raises(ValidationError):
        UploadRequest(**fields)


def test_upload_path() -> None:
    assert upload_path("dev-1") == f"{API_PREFIX}/devices/dev-1/uploads"
    assert upload_path("dev-1").startswith("/api/v1/")
