"""Embedded real services for one machine: a Mosquitto broker and a SeaweedFS S3 gateway.

The demo, the ``edgeloop stack`` command and the integration-test fixtures start the
real programs with configurations generated here; nothing is mocked. Past one machine
these are replaced by a managed broker and object store, reached through the same
settings (see :func:`server.stack.stack.stack_settings_env`).

Attributes are imported lazily so that ``server.stack.cli`` stays cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServiceError": "server.stack.errors",
    "MosquittoBroker": "server.stack.mosquitto",
    "BrokerUsers": "server.stack.mosquitto",
    "SeaweedS3": "server.stack.seaweedfs",
    "EmbeddedStack": "server.stack.stack",
    "StackState": "server.stack.stack",
    "stack_settings_env": "server.stack.stack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
