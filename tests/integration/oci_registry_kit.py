"""A real OCI registry (Debian's ``docker-registry``, CNCF distribution 2.8) and a meddling proxy.

- :func:`running_registry` starts ``docker-registry serve config.yml`` with filesystem
  storage under a temp folder on a free loopback port, waits for ``GET /v2/`` to answer
  200, and stops it (SIGTERM, then SIGKILL). ``REGISTRY_BIN`` is ``None`` when the binary
  is missing (``deploy/setup.sh`` installs it).
- :class:`MeddlingProxy`: a loopback HTTP reverse proxy in front of the registry that
  records every request and lets a test cut a response off after N body bytes or rewrite
  a response body, to test resumed downloads and tampered content.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from server.stack.ports import find_free_port

REGISTRY_BIN = shutil.which("docker-registry") or (
    "/usr/bin/docker-registry" if Path("/usr/bin/docker-registry").is_file() else None
)
MISSING_REASON = (
    "docker-registry is not installed (Debian: apt-get install docker-registry; deploy/setup.sh does it)"
)


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    root: Path  # filesystem storage root
    log: Path

    def blob_data_path(self, digest: str) -> Path:
        """The file the filesystem driver keeps a blob's bytes in."""
        hex_digest = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"


def _config(root: Path, port: int, htpasswd: Path | None) -> str:
    auth = f"auth:\n  htpasswd:\n    realm: edgeloop-test\n    path: {htpasswd}\n" if htpasswd else ""
    return (
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        f"{auth}"
    )


@contextlib.contextmanager
def running_registry(
    workdir: Path, *, htpasswd: Path | None = None, timeout: float = 20.0
) -> Iterator[Registry]:
    assert REGISTRY_BIN is not None, MISSING_REASON
    root = workdir / "storage"
    root.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _attempt in range(3):  # a free port can be taken before the registry binds it
        port = find_free_port()
        config = workdir / "config.yml"
        config.write_text(_config(root, port, htpasswd))
        log = workdir / "registry.log"
        with open(log, "wb") as log_handle:
            proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config)], stdout=log_handle, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + timeout
            ready = False
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status = httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1.0).status_code
                    if status in (200, 401 if htpasswd else 200):
                        ready = True
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            if ready:
                yield Registry(host=f"127.0.0.1:{port}", root=root, log=log)
                return
            last_error = log.read_text(errors="replace")[-2000:]
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    raise RuntimeError(f"docker-registry did not start; its log ends:\n{last_error}")


# -- the proxy ------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


# A rule gets (method, path, request headers) and returns None (pass through) or an action.
@dataclass
class Cut:
    """Send the upstream status and headers, then only ``after`` body bytes, then drop the connection."""

    after: int


@dataclass
class Rewrite:
    """Replace the response body with ``body(old)``; Content-Length follows the new body."""

    body: Callable[[bytes], bytes]


Rule = Callable[[str, str, dict[str, str]], "Cut | Rewrite | None"]


@dataclass
class MeddlingProxy:
    upstream: str  # 127.0.0.1:PORT
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    host: str = ""

    def requests_to(self, fragment: str, method: str = "GET") -> list[Seen]:
        return [s for s in self.seen if s.method == method and fragment in s.path]


def _handler(proxy: MeddlingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
            pass

        def _forward(self) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            seen = Seen(self.command, self.path, dict(self.headers.items()))
            proxy.seen.append(seen)
            action = None
            for rule in proxy.rules:
                action = rule(self.command, self.path, dict(self.headers.items()))
                if action is not None:
                    break
            host, port = proxy.upstream.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                seen.status = response.status
                if isinstance(action, Rewrite):
                    data = action.body(data)
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() in ("content-length", "connection", "transfer-encoding"):
                        continue
                    self.send_header(key, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", response.getheader("Content-Length") or "0")
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if isinstance(action, Cut):
                    self.wfile.write(data[: action.after])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(2)
                    return
                self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    return Handler


@contextlib.contextmanager
def meddling_proxy(upstream: str) -> Iterator[MeddlingProxy]:
    proxy = MeddlingProxy(upstream=upstream)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def module_registry(tmp_path_factory) -> Iterator[Registry]:
    """The body of a module-scoped ``registry`` fixture: a missing registry fails the tests that
    need it (tests/integration/conftest.py), never skips them."""
    import pytest

    if REGISTRY_BIN is None:
        pytest.fail(MISSING_REASON, pytrace=False)
    with running_registry(tmp_path_factory.mktemp("oci-registry")) as reg:
        yield reg
