"""Shared by the dashboard's stream test and its browser test: the real server app behind uvicorn on a
real port (in this process, so tests can seed its database), API tokens per role, and a reader of
its server-sent events in a background thread."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from server.auth import Role, issue_token
from server.stack.ports import find_free_port


def wait_for(what: str, check: Callable[[], object], timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class LiveServer:
    """``create_app(settings)`` served by uvicorn in a thread. A graceful-shutdown timeout bounds
    ``stop()`` even if a client left a stream open (uvicorn in a thread installs no signal handlers,
    so sse-starlette cannot see it exit)."""

    def __init__(self, settings) -> None:
        import uvicorn

        from server.app import create_app

        self.port = settings.port
        self.app = create_app(settings)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                                     lifespan="on", timeout_graceful_shutdown=3))
        self._thread = threading.Thread(target=self._server.run, name="dashboard-server", daemon=True)

    @staticmethod
    def free_port() -> int:
        return find_free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ctx(self):
        return self.app.state.ctx

    def start(self) -> LiveServer:
        self._thread.start()
        wait_for("the server to start", lambda: self._server.started or not self._thread.is_alive(), 60)
        assert self._server.started, "the server did not start (see the log above)"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def token(self, role: Role, subject: str) -> str:
        with self.ctx.sessions() as session:
            token = issue_token(session, role, subject)
            session.commit()
        return token


@dataclass
class Event:
    event: str
    data: str
    id: str | None = None

    def json(self):
        return json.loads(self.data)


class SseReader:
    """Reads ``GET url`` as server-sent events into a queue until the stream ends or ``close()``."""

    def __init__(self, url: str, *, headers: dict | None = None, cookies: dict | None = None) -> None:
        self.events: queue.Queue[Event | None] = queue.Queue()
        self.status: int | None = None
        self.body = ""
        self.ended = threading.Event()
        self._client = httpx.Client(headers=headers or {}, cookies=cookies or {}, timeout=httpx.Timeout(5, read=60))
        self._url = url
        self._connected = threading.Event()
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self._connected.wait(15), "the stream did not answer"

    def _read(self) -> None:
        try:
            with self._client.stream("GET", self._url) as response:
                self.status = response.status_code
                stream = response.extensions.get("network_stream")
                self._socket = stream.get_extra_info("socket") if stream is not None else None
                if response.status_code != 200:
                    self.body = response.read().decode()
                    self._connected.set()
                    return
                self._connected.set()
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if line == "":
                        if "data" in fields or "event" in fields:
                            self.events.put(Event(fields.get("event", "message"), fields.get("data", ""),
                                                  fields.get("id")))
                        fields = {}
                    elif line.startswith(":"):
                        continue
                    else:
                        name, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value
        except httpx.HTTPError:
            pass
        finally:
            self._connected.set()
            self.ended.set()
            self.events.put(None)

    def next(self, timeout: float = 20.0) -> Event | None:
        """The next event; None when the stream ended. Raises on timeout."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout} s") from None

    def until(self, predicate: Callable[[Event], bool], timeout: float = 20.0) -> tuple[Event, list[Event]]:
        """Read until an event matches; (that event, every event read before it)."""
        seen: list[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event within {timeout} s; saw {[e.event for e in seen]}")
            event = self.next(left)
            if event is None:
                raise AssertionError(f"the stream ended first; saw {[e.event for e in seen]}")
            if predicate(event):
                return event, seen
            seen.append(event)

    def drain(self, seconds: float) -> list[Event]:
        """Every event within ``seconds``."""
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                break
            if event is None:
                break
            out.append(event)
        return out

    def close(self) -> None:
        # Wake the reader blocked in recv(): shutting the socket down ends its read at once.
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._client.close()
        self._thread.join(10)
