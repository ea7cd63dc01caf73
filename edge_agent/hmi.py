"""A small local HTTP endpoint where the line HMI posts an operator's correction for a frame.

    POST /v1/corrections   {"frame_id": "...", "labels": [{"cls": 0, "cx": .5, "cy": .5, "w": .1, "h": .1}],
                            "operator": "optional"}
    GET  /v1/frames/recent  frames still correctable, newest first, with the model's predictions
    GET  /v1/health         liveness (never needs the token)

Answers (JSON): 202 ``{"status": "collected", "sample_id"}``; 200 with ``status`` ``model_agreed``
(the labels say what the model said: nothing to learn), ``already_collected`` (a retry: same
``sample_id``) or ``near_duplicate`` (a correction of the same scene was just sent); 400 body is
not JSON; 401 token missing or wrong; 403 corrections are switched off; 404 frame unknown or no
longer buffered, or no such path; 405 wrong method; 411 no Content-Length; 413 body too large;
422 schema or class id outside the model's classes; 429 rate limit or daily quota (with
``Retry-After``); 500 the sample could not be stored.

Stdlib ``http.server`` in a daemon thread: nothing new to install on the device, and the
request logic (:class:`CorrectionApi`) is kept apart from the sockets.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from edge_agent.collector import Outcome, SampleCollector, labels_to_detections, to_box
from edge_agent.frame_buffer import FrameBuffer
from edge_agent.inference.types import Detection
from protocol.messages import MAX_BOXES

if TYPE_CHECKING:
    from edge_agent.settings import AgentSettings

log = structlog.get_logger(__name__)

# A body this much over the limit is still read (and thrown away) before the 413, so the client
# sees the answer instead of a connection reset; anything larger is cut off.
_DRAIN_LIMIT = 1024 * 1024


class CorrectionLabel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cls: StrictInt = Field(ge=0)
    cx: float = Field(gt=0, le=1)
    cy: float = Field(gt=0, le=1)
    w: float = Field(gt=0, le=1)
    h: float = Field(gt=0, le=1)


class CorrectionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    frame_id: str = Field(min_length=1, max_length=128)
    # An empty list is a valid correction: "there is nothing in this frame".
    labels: list[CorrectionLabel] = Field(max_length=MAX_BOXES)
    operator: str | None = Field(default=None, max_length=128)


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: HTTPStatus, error: str, detail: Any, **headers: str) -> Response:
    return Response(int(status), {"error": error, "detail": detail}, headers)


class CorrectionApi:
    """What each request means, without sockets."""

    def __init__(self, collector: SampleCollector, frames: FrameBuffer, *, token: str | None,
                 max_body_bytes: int, on_verdict: Callable[[bool], object] | None = None,
                 on_truth: Callable[[str, list[Detection]], object] | None = None) -> None:
        self.collector = collector
        self.frames = frames
        self.token = token or None
        self.max_body_bytes = max_body_bytes
        # QA's verdict on a served frame (True: the model was wrong), e.g. for the drift window's
        # correction rate; called for every judged frame, collected or not.
        self.on_verdict = on_verdict
        # The operator's labels as the frame's truth (e.g. for the shadow comparison of that frame).
        self.on_truth = on_truth

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def health(self) -> Response:
        return Response(200, {"status": "ok", "frames_buffered": len(self.frames)})

    def recent(self) -> Response:
        now = time.monotonic()
        frames = []
        for f in self.frames.recent():
            h, w = f.image.shape[:2]
            frames.append({"frame_id": f.frame_id, "model_version": f.model_version, "width": w, "height": h,
                           "age_s": round(max(0.0, now - f.added_at), 3),
                           "predictions": [to_box(d, w, h) for d in f.detections][:MAX_BOXES]})
        return Response(200, {"frames": frames, "max_frames": self.frames.max_frames})

    def post_correction(self, body: bytes) -> Response:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(HTTPStatus.BAD_REQUEST, "malformed_json", str(exc))
        try:
            request = CorrectionRequest.model_validate(payload)
        except ValidationError as exc:
            return _error(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_correction",
                          exc.errors(include_url=False, include_context=False, include_input=False))
        frame = self.frames.get(request.frame_id)
        if frame is None:
            return _error(HTTPStatus.NOT_FOUND, "frame_not_found",
                          f"frame {request.frame_id!r} is not among the {len(self.frames)} recent frames "
                          f"this agent keeps (at most {self.frames.max_frames}): it expired or never existed")
        names = frame.class_names
        if names is not None:
            bad = sorted({label.cls for label in request.labels if label.cls >= len(names)})
            if bad:
                return _error(HTTPStatus.UNPROCESSABLE_ENTITY, "unknown_class",
                              f"class ids {bad} are not classes of model v{frame.model_version}: "
                              f"valid ids are 0..{len(names) - 1} ({', '.join(names)})")
        labels = [(lb.cls, lb.cx, lb.cy, lb.w, lb.h) for lb in request.labels]
        decision = self.collector.submit_correction(frame.image, frame.frame_id, labels, frame.detections,
                                                    frame.model_version)
        log.info("hmi.correction", frame_id=frame.frame_id, operator=request.operator, labels=len(labels),
                 outcome=decision.outcome.value, sample_id=decision.sample_id)
        if self.on_verdict is not None and decision.outcome is not Outcome.DISABLED:
            self.on_verdict(decision.outcome is not Outcome.MODEL_AGREED)
        if self.on_truth is not None:
            h, w = frame.image.shape[:2]
            self.on_truth(frame.frame_id, labels_to_detections(labels, w, h))
        outcome = decision.outcome
        if outcome is Outcome.COLLECTED:
            return Response(202, {"status": "collected", "sample_id": decision.sample_id})
        if outcome is Outcome.ALREADY_COLLECTED:
            return Response(200, {"status": "already_collected", "sample_id": decision.sample_id})
        if outcome in (Outcome.MODEL_AGREED, Outcome.NEAR_DUPLICATE):
            return Response(200, {"status": outcome.value})
        if outcome is Outcome.DISABLED:
            return _error(HTTPStatus.FORBIDDEN, "corrections_disabled", "this agent does not collect corrections")
        if outcome in (Outcome.RATE_LIMITED, Outcome.QUOTA_EXHAUSTED):
            wait = math.ceil(decision.retry_after_s or 0)
            what = "daily quota" if outcome is Outcome.QUOTA_EXHAUSTED else "hourly rate limit"
            return Response(429, {"error": outcome.value, "retry_after_s": wait,
                                  "detail": f"the {what} for corrections is used up; retry in {wait} s"},
                            {"Retry-After": str(wait)})
        return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "store_failed", "the sample could not be stored (logged)")


_ROUTES = {"/v1/health": "GET", "/v1/frames/recent": "GET", "/v1/corrections": "POST"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgeloop-hmi"
    sys_version = ""
    timeout = 15  # seconds per socket read: a stalled client cannot hold a thread forever
    api: CorrectionApi  # set on the per-server subclass

    def _send(self, response: Response) -> None:
        data = json.dumps(response.body).encode()
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        allowed = _ROUTES.get(path)
        if allowed is None:
            self._discard_body()
            return self._send(_error(HTTPStatus.NOT_FOUND, "not_found", f"no endpoint {path}"))
        if method != allowed:
            self._discard_body()
            return self._send(_error(HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed",
                                     f"{path} takes {allowed}", Allow=allowed))
        if path == "/v1/health":
            return self._send(self.api.health())
        if not self.api.authorized(self.headers.get("Authorization")):
            self._discard_body()
            return self._send(_error(HTTPStatus.UNAUTHORIZED, "unauthorized", "missing or wrong bearer token",
                                     **{"WWW-Authenticate": "Bearer"}))
        if path == "/v1/frames/recent":
            return self._send(self.api.recent())
        body = self._read_body()
        if body is None:
            return None
        try:
            response = self.api.post_correction(body)
        except Exception as exc:  # a bug here must not kill the HMI thread or the agent
            log.exception("hmi.error", error=str(exc))
            response = _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error", type(exc).__name__)
        return self._send(response)

    def _discard_body(self) -> None:
        """Read and drop a body nobody will look at, so the client sees the answer (not a reset) and
        the connection stays usable; one too large or of unknown length closes the connection."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return
        try:
            remaining = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            remaining = -1
        if not 0 <= remaining <= self.api.max_body_bytes + _DRAIN_LIMIT:
            self.close_connection = True
            return
        while remaining > 0 and (chunk := self.rfile.read(min(remaining, 65536))):
            remaining -= len(chunk)

    def _read_body(self) -> bytes | None:
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            self._send(_error(HTTPStatus.LENGTH_REQUIRED, "length_required", "send a Content-Length"))
            return None
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._send(_error(HTTPStatus.BAD_REQUEST, "bad_content_length", f"Content-Length {raw!r}"))
            return None
        limit = self.api.max_body_bytes
        if length > limit:
            self._discard_body()
            self._send(_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body_too_large",
                              f"{length} bytes; at most {limit}"))
            return None
        return self.rfile.read(length)

    # http.server dispatches each request to do_<METHOD>.
    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("hmi.request", client=self.client_address[0], line=format % args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CorrectionServer:
    """The HTTP server in a daemon thread. ``port=0`` takes a free port (see :attr:`port`)."""

    def __init__(self, api: CorrectionApi, host: str = "127.0.0.1", port: int = 0) -> None:
        if not _is_loopback(host) and api.token is None:
            raise ValueError(f"the HMI endpoint binds {host!r}, beyond loopback: set a token (hmi_token)")
        handler = type("HmiHandler", (_Handler,), {"api": api})
        server_cls = type("HmiServer", (ThreadingHTTPServer,), {
            "daemon_threads": True,
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
        })
        self.api = api
        self._httpd = server_cls((host, port), handler)
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: AgentSettings, collector: SampleCollector, frames: FrameBuffer,
                      on_verdict: Callable[[bool], object] | None = None,
                      on_truth: Callable[[str, list[Detection]], object] | None = None) -> CorrectionServer:
        api = CorrectionApi(collector, frames, token=settings.hmi_token.get_secret_value() or None,
                            max_body_bytes=settings.hmi_max_body_bytes, on_verdict=on_verdict, on_truth=on_truth)
        return cls(api, settings.hmi_host, settings.hmi_port)

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> CorrectionServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="hmi", daemon=True)
        self._thread.start()
        log.info("hmi.listening", url=self.url, token=self.api.token is not None)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout)
            self._thread = None
        self._httpd.server_close()
