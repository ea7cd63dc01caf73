"""Drains the spool: presigned PUT to the object store, then the QoS 1 ``samples`` event.

An event is published only after its upload succeeded, and an item leaves the spool only
after the broker acknowledged its event; every failure backs off and retries in order.
"""

from __future__ import annotations

import threading

import httpx
import structlog

from edge_agent.spool import Spool, SpoolItem
from protocol.api import UploadGrant, UploadRequest, upload_path
from protocol.messages import SampleEvent

log = structlog.get_logger(__name__)


class PermanentUploadError(RuntimeError):
    """The server refuses this sample for good (e.g. too large): retrying cannot help."""


class Uploader:
    def __init__(self, spool: Spool, http: httpx.Client, device_id: str, mqtt, max_backoff: float = 300.0) -> None:
        self._spool = spool
        self._http = http
        self._device_id = device_id
        self._mqtt = mqtt
        self._max_backoff = max_backoff
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uploader", daemon=True)
        self.sent = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            item = self._spool.next_due()
            if item is None:
                self._stop.wait(0.3)
                continue
            try:
                self.process(item)
            except PermanentUploadError as exc:
                log.error("upload.dropped", sample=item.sample_id, reason=str(exc))
                self._spool.drop(item.sample_id, str(exc))
            except Exception as exc:  # outage of the server, store or broker: back off, keep order
                backoff = min(2.0 ** min(item.attempts, 10), self._max_backoff)
                log.warning("upload.retry", sample=item.sample_id, error=str(exc), backoff=backoff)
                self._spool.mark_failed(item.sample_id, str(exc), backoff)
                self._stop.wait(min(backoff, 1.0))

    def _grant(self, item: SpoolItem) -> UploadGrant:
        meta = item.meta
        request = UploadRequest(sha256=meta["sha256"], size_bytes=meta["size_bytes"], content_type=item.content_type)
        response = self._http.post(upload_path(self._device_id), json=request.model_dump())
        if response.status_code in (400, 413, 422):
            raise PermanentUploadError(f"server refused the upload: {response.status_code} {response.text[:200]}")
        response.raise_for_status()
        return UploadGrant.model_validate(response.json())

    def process(self, item: SpoolItem) -> None:
        object_key = item.object_key
        if item.state == "pending":
            grant = self._grant(item)
            data = item.path.read_bytes()
            put = self._http.put(grant.url, content=data, headers=grant.headers)
            if put.status_code >= 300:
                raise RuntimeError(f"object store PUT failed: {put.status_code} {put.text[:200]}")
            self._spool.mark_uploaded(item.sample_id, grant.object_key)
            object_key = grant.object_key
        event = SampleEvent(device_id=self._device_id, sample_id=item.sample_id, object_key=object_key,
                            content_type=item.content_type, **item.meta)
        if not self._mqtt.publish_and_wait(event, timeout=10):
            raise RuntimeError("broker did not acknowledge the sample event")
        self._spool.mark_sent(item.sample_id)
        self.sent += 1
