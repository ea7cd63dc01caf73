"""TEST ONLY: kill the agent with SIGKILL at one named point of the update machine.

``EDGELOOP_AGENT_CRASH_AT=<point>`` arms it; unset (always, in production) it does nothing.
Points are state names, fired right after that state is persisted (by a transition, or by a
resume after a restart), and ``PROMOTING+switched`` / ``ROLLING_BACK+switched`` (the active link
has moved, the next state is not yet persisted), ``DOWNLOADING+partial`` (part of the bundle
is on disk). The crash tests (tests/integration/test_agent_crash_resume.py) use it the way
Mender's state tests do: kill at every state, restart without it, check the resume path.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping

ENV_VAR = "EDGELOOP_AGENT_CRASH_AT"

CrashHook = Callable[[str], None]


def no_crash(point: str) -> None:
    return None


def from_environ(environ: Mapping[str, str] = os.environ) -> CrashHook:
    target = environ.get(ENV_VAR, "").strip()
    if not target:
        return no_crash

    def crash(point: str) -> None:
        if point == target:
            # Straight to stderr: a structlog line may still sit in a buffer when the process dies.
            sys.stderr.write(f"{ENV_VAR}: SIGKILL at {point}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return crash
