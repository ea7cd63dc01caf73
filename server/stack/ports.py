"""Free-port finding and waiting for TCP ports, on the loopback interface by default."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable, Iterable

from server.stack.errors import ServiceError

DEFAULT_HOST = "127.0.0.1"


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def find_free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port on ``host`` that nothing listens on now (the kernel picks it: bind port 0).

    Another process may take it before the caller binds it; callers that start a
    service on it treat a failed start as a possible collision.
    """
    with contextlib.closing(_bind(host, 0)) as sock:
        return sock.getsockname()[1]


def find_free_ports(count: int, host: str = DEFAULT_HOST) -> list[int]:
    """``count`` distinct free ports (all held open until every one is found)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(_bind(host, 0))
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def find_free_port_pairs(
    count: int,
    offset: int = 10000,
    host: str = DEFAULT_HOST,
    *,
    low: int = 20000,
    high: int = 30000,
    attempts: int = 500,
    avoid: Iterable[int] = (),
) -> list[int]:
    """``count`` distinct ports ``p`` such that ``p`` and ``p + offset`` are both free.

    Services such as SeaweedFS derive a gRPC port as ``http port + 10000``; picking
    ``p`` below the kernel's ephemeral range keeps ``p + offset`` a valid port and
    makes it less likely that an outgoing connection takes it meanwhile. Ports in
    ``avoid`` (already promised to someone) are never returned as either member.
    """
    if high + offset > 65535 or low < 1024 or low >= high:
        raise ValueError(f"bad range [{low}, {high}) for offset {offset}")
    rng = random.SystemRandom()
    held: list[socket.socket] = []
    found: list[int] = []
    taken = set(avoid)
    try:
        for _ in range(attempts):
            if len(found) == count:
                break
            port = rng.randrange(low, high)
            if port in taken or port + offset in taken:
                continue
            try:
                first = _bind(host, port)
            except OSError:
                continue
            try:
                second = _bind(host, port + offset)
            except OSError:
                first.close()
                continue
            held += [first, second]
            found.append(port)
            taken |= {port, port + offset}
    finally:
        for sock in held:
            sock.close()
    if len(found) < count:
        raise ServiceError(f"could not find {count} free port pairs (offset {offset}) on {host}")
    return found


def port_is_free(port: int, host: str = DEFAULT_HOST) -> bool:
    """Whether ``port`` can be bound on ``host`` now."""
    try:
        _bind(host, port).close()
    except OSError:
        return False
    return True


def port_is_open(port: int, host: str = DEFAULT_HOST, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    *,
    what: str,
    interval: float = 0.05,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll ``predicate`` until it holds; raise :class:`ServiceError` after ``timeout``
    seconds, or as soon as ``alive()`` says the process that should make it hold died."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if alive is not None and not alive():
            raise ServiceError(f"{what}: the process exited")
        if time.monotonic() >= deadline:
            raise ServiceError(f"{what}: timed out after {timeout:g} s")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


def wait_for_port(
    port: int,
    host: str = DEFAULT_HOST,
    timeout: float = 10.0,
    *,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections."""
    wait_until(
        lambda: port_is_open(port, host),
        timeout,
        what=f"waiting for {host}:{port} to accept connections",
        alive=alive,
    )


def wait_for_port_closed(port: int, host: str = DEFAULT_HOST, timeout: float = 10.0) -> None:
    """Wait until nothing accepts TCP connections on ``host:port`` any more."""
    wait_until(lambda: not port_is_open(port, host), timeout, what=f"waiting for {host}:{port} to close")
