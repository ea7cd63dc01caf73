"""Drains the spool: presigned PUT to the object store, then the QoS 1 ``samples`` event.

An event is published only after its upload succeeded, and an item leaves the spool only
after the broker acknowledged its event. Items drain strictly in capture order: when the
server, the object store or the broker fails, the whole drain pauses with exponential backoff
(with jitter, so a fleet does not retry in step after an outage) and retries the same oldest
item; the first success resets the backoff. When the broker was the one down, the pause ends
as soon as the MQTT client has reconnected. A repeat after a lost acknowledgement re-sends the
same sample id, which the server stores once.
"""

from __future__ import annotations

import random
import threading
import time

import httpx
import structlog
from pydantic import ValidationError

from edge_agent.spool import Spool, SpoolItem
from protocol.api import UploadGrant, UploadRequest, upload_path
from protocol.messages import SampleEvent

log = structlog.get_logger(__name__)


class PermanentUploadError(RuntimeError):
    """The server refuses this sample for good (e.g. too large): retrying cannot help."""


class Uploader:
    def __init__(self, spool: Spool, http: httpx.Client, device_id: str, mqtt, max_backoff: float = 60.0,
                 idle_poll: float = 0.3, rng: random.Random | None = None) -> None:
        self._spool = spool
        self._http = http
        self._device_id = device_id
        self._mqtt = mqtt
        self._max_backoff = max_backoff
        self._idle_poll = idle_poll
        self._rng = rng or random.Random()
        self._failures = 0  # consecutive; 0 = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uploader", daemon=True)
        self.sent = 0
        self.last_error = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def backoff(self) -> float:
        """Seconds to pause after the current run of failures: 1, 2, 4, ... capped, times 0.5-1.0."""
        ceiling = min(2.0 ** min(self._failures - 1, 30), self._max_backoff)
        return ceiling * self._rng.uniform(0.5, 1.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                if self._stop.is_set():
                    return  # the spool closed under a last attempt at shutdown: the item stays spooled
                # e.g. a disk error in the spool's index: keep the thread, or nothing drains again
                log.exception("upload.loop_failed")
                self._stop.wait(1.0)

    def step(self) -> bool:
        """Try the oldest due item once; False when there was nothing to do (after a short idle wait)."""
        item = self._spool.next_due(claim=True)
        if item is None:
            self._stop.wait(self._idle_poll)
            return False
        try:
            self.process(item)
        except PermanentUploadError as exc:
            log.error("upload.dropped", sample=item.sample_id, reason=str(exc))
            self._spool.drop(item.sample_id, str(exc))
        except Exception as exc:  # outage of the server, store or broker: pause the drain, keep order
            self._failures += 1
            delay = self.backoff()
            self.last_error = str(exc)
            broker_down = not self._broker_connected()
            log.warning("upload.retry", sample=item.sample_id, error=str(exc), attempt=self._failures,
                        backoff=round(delay, 2), broker_connected=not broker_down)
            # The pause below is the backoff: the item stays due, so it is the first one retried.
            self._spool.mark_failed(item.sample_id, str(exc), 0.0)
            self._pause(delay, wake_on_connect=broker_down)
        else:
            if self._failures:
                log.info("upload.recovered", after_failures=self._failures)
            self._failures = 0
        return True

    def _broker_connected(self) -> bool:
        return bool(getattr(self._mqtt, "connected", True))

    def _pause(self, delay: float, *, wake_on_connect: bool) -> None:
        """Wait ``delay`` seconds, or less when the broker was down and its client reconnected
        meanwhile (paho's own reconnect loop is the best outage probe there is)."""
        deadline = time.monotonic() + delay
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._stop.wait(min(remaining, 0.5))
            if wake_on_connect and self._broker_connected():
                log.info("upload.broker_back", retrying_early_by=round(max(deadline - time.monotonic(), 0), 2))
                return

    def _grant(self, item: SpoolItem) -> UploadGrant:
        meta = item.meta
        try:
            request = UploadRequest(sha256=meta["sha256"], size_bytes=meta["size_bytes"],
                                    content_type=item.content_type)
        except (ValidationError, KeyError) as exc:  # e.g. over the protocol's size limit
            raise PermanentUploadError(f"sample cannot be uploaded: {exc}") from None
        response = self._http.post(upload_path(self._device_id), json=request.model_dump())
        if response.status_code in (400, 413, 422):
            raise PermanentUploadError(f"server refused the upload: {response.status_code} {response.text[:200]}")
        response.raise_for_status()
        return UploadGrant.model_validate(response.json())

    def _event(self, item: SpoolItem, object_key: str) -> SampleEvent:
        try:
            return SampleEvent(device_id=self._device_id, sample_id=item.sample_id, object_key=object_key,
                               content_type=item.content_type, **item.meta)
        except (ValidationError, TypeError) as exc:
            raise PermanentUploadError(f"spooled metadata does not make a valid sample event: {exc}") from None

    def process(self, item: SpoolItem) -> None:
        # Build the event first: metadata that can never be sent must not be uploaded either.
        self._event(item, item.object_key or "pending")
        object_key = item.object_key
        if item.state == "pending":
            try:
                data = item.path.read_bytes()
            except FileNotFoundError:
                raise PermanentUploadError(f"spooled file {item.path.name} is gone") from None
            grant = self._grant(item)
            put = self._http.put(grant.url, content=data, headers=grant.headers)
            if put.status_code >= 300:
                raise RuntimeError(f"object store PUT failed: {put.status_code} {put.text[:200]}")
            self._spool.mark_uploaded(item.sample_id, grant.object_key)
            object_key = grant.object_key
        if not self._mqtt.publish_and_wait(self._event(item, object_key), timeout=10):
            raise RuntimeError("broker did not acknowledge the sample event")
        self._spool.mark_sent(item.sample_id)
        self.sent += 1
