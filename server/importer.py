"""Labeled images imported by an engineer (YOLO exports from CVAT, Label Studio, Roboflow).

They go through the same ingest checks as a device's samples and become samples of source
``import:<name>``; the data contract then checks them with everything else before training.
Importing the same image again is a no-op (the sample id is the image's sha256).
"""

from __future__ import annotations

import hashlib
import re

import cv2
import numpy as np
from pydantic import ValidationError
from sqlalchemy.orm import Session

from protocol.messages import Box
from server.db.models import Sample
from server.sample_validation import ImageLimits, SampleRejected, check_image_header, check_labels

SOURCE_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,40}$")
CONTENT_TYPES = {b"\xff\xd8\xff": ("image/jpeg", ".jpg"), b"\x89PNG\r\n\x1a\n": ("image/png", ".png")}


def import_source(name: str) -> str:
    if not SOURCE_RE.fullmatch(name):
        raise ValueError(f"import source {name!r} must match {SOURCE_RE.pattern}")
    return f"import:{name}"


def import_image(session: Session, store, source: str, data: bytes, labels: list[dict],
                 class_names: list[str], limits: ImageLimits) -> tuple[str, str, str]:
    """Store one image as a sample; returns (sample_id, status, reason)."""
    sample_id = hashlib.sha256(data).hexdigest()
    if session.get(Sample, sample_id) is not None:
        return sample_id, "duplicate", "already imported"
    kind = next((v for magic, v in CONTENT_TYPES.items() if data.startswith(magic)), None)
    status, reason, width, height = "validated", "", 0, 0
    try:
        if len(data) > limits.max_bytes:
            raise SampleRejected(f"image is {len(data)} bytes, over the {limits.max_bytes}-byte limit")
        if kind is None:
            raise SampleRejected("not a JPEG or PNG image")
        width, height = check_image_header(data, limits)  # before decoding: a tiny file may declare a huge image
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None or image.shape[1::-1] != (width, height):
            raise SampleRejected("image does not decode")
        try:
            boxes = [Box.model_validate(b) for b in labels]
        except ValidationError as exc:
            raise SampleRejected(f"labels do not parse: {exc.errors()[0]['msg']}") from None
        check_labels(boxes, class_names)
    except SampleRejected as exc:
        status, reason = "rejected", str(exc)
    content_type, suffix = kind or ("application/octet-stream", ".bin")
    key = f"images/{source.replace(':', '-')}/{sample_id}{suffix}"
    store.put_bytes(key, data, content_type)
    session.add(Sample(id=sample_id, device_id=source, object_key=key, sha256=sample_id, size_bytes=len(data),
                       width=width, height=height, reason="import", labels=labels, predictions=[],
                       status=status, reject_reason=reason))
    return sample_id, status, reason
