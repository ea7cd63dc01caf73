"""The dashboard's live stream: ``GET /api/v1/events``, server-sent events.

One :class:`LiveHub` per app computes every topic of ``server.api.live_views`` on its own short
interval, off the event loop, while at least one stream is open, and keeps each topic's JSON
text and a version number. A stream sends every topic once when it opens, then only the topics
whose JSON changed: N open dashboards cost one set of queries, not N.

A stream is authenticated like any API call (bearer header or the dashboard's session cookie,
viewer role or above). It is closed when its token signs out (``close_streams``) or is revoked
(re-checked every ``REAUTH_S``), after ``MAX_STREAM_S`` (the browser's EventSource reconnects
on its own), and on server shutdown (sse-starlette watches uvicorn's exit signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from sse_starlette import EventSourceResponse, ServerSentEvent

from protocol.api import API_PREFIX
from server.api import live_views
from server.api.deps import bearer_scheme, cookie_scheme, get_context, require
from server.auth import Principal, Role, authenticate, hash_token
from server.context import ServerContext

log = structlog.get_logger(__name__)

router = APIRouter(prefix=API_PREFIX)

TICK_S = 0.25  # how often the hub looks for due topics
REAUTH_S = 15.0  # how often an open stream re-checks its token (revocation)
MAX_STREAM_S = 600.0  # a stream's lifetime; the browser reconnects at once
MAX_STREAMS = 200  # per server process
TREND_EVERY_S = 10.0  # one point of the in-memory trend series per this many seconds
TREND_POINTS = 360  # one hour at 10 s
RETRY_MS = 2000  # EventSource reconnect delay the server asks for


@dataclass(eq=False)
class Subscription:
    token_hash: str
    principal: Principal
    topics: frozenset[str]
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    seen: dict[str, int] = field(default_factory=dict)

    def close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.reason = reason
            self.closed.set()


class TrendRecorder:
    """Recent history the database does not keep: the fleet's speed from the heartbeats (only the
    last one is stored per device), one point per ``TREND_EVERY_S`` from the fleet view the hub
    computed anyway. In memory, per process: the dashboard's last hour; Prometheus keeps the long
    history. (Shadow agreement over time comes from the stored shadow reports, in ``rollouts``.)"""

    def __init__(self, points: int = TREND_POINTS) -> None:
        self.fleet: deque[list] = deque(maxlen=points)

    def record(self, now: float, fleet: dict | None) -> None:
        if fleet is None:
            return
        online = [d for d in fleet.get("devices", []) if d.get("online")]
        fps = [d["fps"] for d in online if d.get("fps") is not None]
        p50 = [d["latency_ms_p50"] for d in online if d.get("latency_ms_p50") is not None]
        p99 = [d["latency_ms_p99"] for d in online if d.get("latency_ms_p99") is not None]
        self.fleet.append([round(now, 1), len(online), round(sum(fps), 2) if fps else None,
                           _mean(p50), _mean(p99), max(p99) if p99 else None])

    def view(self) -> dict[str, Any]:
        return {"every_s": TREND_EVERY_S,
                "fleet": {"columns": ["t", "online", "fps_total", "latency_ms_p50_mean", "latency_ms_p99_mean",
                                      "latency_ms_p99_max"], "points": list(self.fleet)}}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


class LiveHub:
    """Computes the topics while streams are open and wakes the streams when one changed."""

    def __init__(self, ctx: ServerContext, topics: dict[str, tuple[float, live_views.Builder]] | None = None):
        self._ctx = ctx
        self._topics = topics if topics is not None else live_views.TOPICS
        self._payloads: dict[str, tuple[int, str]] = {}
        self._views: dict[str, dict] = {}
        self._due: dict[str, float] = {}
        self._seq = 0
        self._changed = asyncio.Condition()
        self._subscriptions: set[Subscription] = set()
        self._task: asyncio.Task | None = None
        self._trends = TrendRecorder()
        self._next_trend = 0.0

    @property
    def topic_names(self) -> list[str]:
        return [*self._topics, "trends"]

    @property
    def streams(self) -> int:
        return len(self._subscriptions)

    def check_capacity(self) -> None:
        if len(self._subscriptions) >= MAX_STREAMS:
            raise HTTPException(503, f"too many live streams open ({MAX_STREAMS}); close a dashboard tab")

    def subscribe(self, sub: Subscription) -> None:
        self._subscriptions.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="edgeloop-live-hub")

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    async def close_where(self, predicate, reason: str) -> int:
        closed = 0
        for sub in list(self._subscriptions):
            if predicate(sub):
                sub.close(reason)
                closed += 1
        if closed:
            async with self._changed:
                self._changed.notify_all()
        return closed

    def pending(self, sub: Subscription) -> list[tuple[str, int, str]]:
        """(topic, version, JSON) of every topic ``sub`` has not seen in its current version."""
        out = []
        for topic, (version, payload) in self._payloads.items():
            if topic in sub.topics and sub.seen.get(topic) != version:
                out.append((topic, version, payload))
        return out

    async def wait(self, sub: Subscription, seq: int, timeout: float) -> int:
        """Until something changed after ``seq``, ``sub`` was closed, or ``timeout``; the new seq."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self._seq != seq or sub.closed.is_set()),
                                       timeout)
            return self._seq

    # ------------------------------------------------------------------ computing

    async def _run(self) -> None:
        try:
            while self._subscriptions:
                now = time.monotonic()
                due = [name for name, (every, _) in self._topics.items() if self._due.get(name, 0.0) <= now]
                if due:
                    for name in due:
                        self._due[name] = now + self._topics[name][0]
                    views = await anyio.to_thread.run_sync(self._compute, due)
                    await self._publish(views)
                if now >= self._next_trend:
                    self._next_trend = now + TREND_EVERY_S
                    self._trends.record(time.time(), self._views.get("fleet"))
                    await self._publish({"trends": self._trends.view()})
                await asyncio.sleep(TICK_S)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("live.hub_failed")
            for sub in list(self._subscriptions):
                sub.close("the live view failed on the server; reconnecting")
            async with self._changed:
                self._changed.notify_all()
        finally:
            # Nobody is watching: forget, so the next viewer never sees stale state first.
            self._payloads.clear()
            self._views.clear()
            self._due.clear()
            self._next_trend = 0.0

    def _compute(self, topics: list[str]) -> dict[str, dict]:
        views = {}
        with self._ctx.sessions() as session:
            for name in topics:
                try:
                    views[name] = self._topics[name][1](session, self._ctx.settings)
                except Exception:  # one broken view must not blank the others
                    log.exception("live.view_failed", topic=name)
                    session.rollback()
        return views

    async def _publish(self, views: dict[str, dict]) -> None:
        changed = False
        for name, view in views.items():
            if name != "trends":
                self._views[name] = view
            # Key order is kept (job stages run in order); a builder emits the same order every time.
            payload = json.dumps(view, separators=(",", ":"), default=str)
            current = self._payloads.get(name)
            if current is None or current[1] != payload:
                self._seq += 1
                self._payloads[name] = (self._seq, payload)
                changed = True
        if changed:
            async with self._changed:
                self._changed.notify_all()


def hub_of(app) -> LiveHub:
    hub = getattr(app.state, "live_hub", None)
    if hub is None:
        hub = app.state.live_hub = LiveHub(app.state.ctx)
    return hub


async def close_streams(app, token: str, reason: str) -> int:
    """Close every open stream authenticated by ``token`` (sign-out)."""
    hub = getattr(app.state, "live_hub", None)
    if hub is None or not token:
        return 0
    digest = hash_token(token)
    return await hub.close_where(lambda sub: sub.token_hash == digest, reason)


async def _stream(request: Request, hub: LiveHub, sub: Subscription, token: str) -> AsyncIterator[ServerSentEvent]:
    ctx: ServerContext = request.app.state.ctx
    admin = ctx.settings.admin_token.get_secret_value() if ctx.settings.admin_token else None
    started = next_auth = time.monotonic()
    seq = -1
    hub.subscribe(sub)
    try:
        yield ServerSentEvent(event="hello", retry=RETRY_MS, data=json.dumps(
            {"subject": sub.principal.subject, "role": sub.principal.role.value, "topics": sorted(sub.topics)}))
        while not sub.closed.is_set():
            for topic, version, payload in hub.pending(sub):
                sub.seen[topic] = version
                yield ServerSentEvent(event=topic, id=str(version), data=payload)
            now = time.monotonic()
            if now - started >= MAX_STREAM_S:
                sub.close("stream lifetime reached; reconnect")
                break
            if now >= next_auth:
                next_auth = now + REAUTH_S

                def still_valid() -> bool:
                    with ctx.sessions() as session:
                        return authenticate(session, token, admin) is not None

                if not await anyio.to_thread.run_sync(still_valid):
                    sub.close("token revoked")
                    break
            seq = await hub.wait(sub, seq, timeout=min(REAUTH_S, max(0.1, next_auth - time.monotonic())))
        yield ServerSentEvent(event="closed", data=json.dumps({"reason": sub.reason}))
    finally:
        hub.unsubscribe(sub)


@router.get("/events", include_in_schema=False)
async def live_events(
    request: Request,
    topics: str | None = Query(None, description="comma-separated subset of the topics; default all"),
    ctx: ServerContext = Depends(get_context),
    who: Principal = Depends(require(Role.VIEWER)),
    bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    cookie: str | None = Depends(cookie_scheme),
) -> EventSourceResponse:
    """Server-sent events: ``hello`` first, then one event per topic (fleet, rollouts, models, data,
    pipeline, alerts, drift, trends) carrying that topic's whole JSON view, sent again only when it
    changed; ``closed`` with a reason when the server ends the stream (sign-out, revocation).

    Not in the OpenAPI document: it is a stream, not a paged collection (see the module doc)."""
    token = bearer.credentials.strip() if bearer is not None else (cookie or "")
    hub = hub_of(request.app)
    wanted = set(hub.topic_names)
    if topics:
        asked = {t.strip() for t in topics.split(",") if t.strip()}
        unknown = asked - wanted
        if unknown:
            raise HTTPException(422, f"unknown topics {sorted(unknown)}; known: {sorted(wanted)}")
        wanted = asked
    hub.check_capacity()
    sub = Subscription(token_hash=hash_token(token), principal=who, topics=frozenset(wanted))
    return EventSourceResponse(_stream(request, hub, sub, token), ping=15, send_timeout=30,
                               headers={"Cache-Control": "no-store"})
