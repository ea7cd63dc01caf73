"""Errors of the embedded services."""

from __future__ import annotations


class ServiceError(RuntimeError):
    """An embedded service could not be found, configured, started, reached or stopped."""
