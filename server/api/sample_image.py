"""A collected frame's image for the dashboard's gallery, read through the server from the object store
(browsers at the plant need not reach the store; the image's size is capped like at ingest)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Response

from protocol.api import API_PREFIX
from server.api.deps import get_context, require
from server.api.schemas import ErrorResponse
from server.auth import Principal, Role
from server.context import ServerContext
from server.db.models import Sample
from server.objectstore import ObjectNotFoundError, ObjectStoreError, ObjectTooLargeError

router = APIRouter(prefix=API_PREFIX)



def _media_type(data: bytes) -> str | None:
    """By content, not by key: only the two formats ingest accepts are served."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return None


@router.get("/samples/{sample_id}/image", response_class=Response, responses={
    200: {"content": {"image/jpeg": {}, "image/png": {}}, "description": "the frame as the device uploaded it"},
    404: {"model": ErrorResponse, "description": "no such sample, or its object is gone"},
    413: {"model": ErrorResponse, "description": "the object is larger than the sample size limit"},
    503: {"model": ErrorResponse, "description": "the object store is unavailable"},
})
def sample_image(sample_id: str, ctx: ServerContext = Depends(get_context),
                 _: Principal = Depends(require(Role.VIEWER))) -> Response:
    """The image of one collected sample (viewer); at most the server's sample size limit."""
    with ctx.sessions() as session:
        sample = session.get(Sample, sample_id)
        if sample is None:
            raise HTTPException(404, f"sample {sample_id} does not exist")
        key, sha = sample.object_key, sample.sha256
    try:
        data = ctx.store.get_bytes(key, ctx.settings.max_sample_bytes)
    except ObjectNotFoundError:
        raise HTTPException(404, f"the image of sample {sample_id} is not in the object store") from None
    except ObjectTooLargeError as exc:
        raise HTTPException(413, str(exc)) from None
    except ObjectStoreError as exc:
        raise HTTPException(503, f"object store: {exc}") from None
    media = _media_type(data)
    if media is None:
        raise HTTPException(404, f"the object of sample {sample_id} is not a JPEG or PNG image")
    # Keys are content-addressed (sha256), so the bytes never change under this URL.
    return Response(data, media_type=media, headers={
        "Cache-Control": "private, max-age=86400, immutable", "ETag": f'"{sha}"',
        "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"})
