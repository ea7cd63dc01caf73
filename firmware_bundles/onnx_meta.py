"""Class names and image size from an ONNX model's metadata, as Ultralytics exports them.

Ultralytics writes ``metadata_props`` as Python literals: ``names`` like
``"{0: 'scratch', 1: 'dent'}"`` and ``imgsz`` like ``"[160, 160]"``. They are parsed
with ``ast.literal_eval`` (never ``eval``). ``onnx`` is imported only when asked for,
since an edge install does not have it.
"""

from __future__ import annotations

import ast
import os


class OnnxMetadataError(ValueError):
    """Metadata that is absent or not in the Ultralytics shape."""


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """``metadata_props`` as a dict, or None when the ``onnx`` package is not installed."""
    try:
        import onnx
    except ImportError:
        return None
    # External weights are not needed to read the metadata.
    model = onnx.load(os.fspath(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def _literal(text: str, key: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise OnnxMetadataError(f"ONNX metadata {key!r} is not a Python literal: {text[:80]!r}") from None


def parse_names(text: str) -> list[str]:
    """``"{0: 'a', 1: 'b'}"`` (or ``"['a', 'b']"``) → ``['a', 'b']``; ids must be 0..n-1."""
    value = _literal(text, "names")
    if isinstance(value, list | tuple):
        value = dict(enumerate(value))
    if not isinstance(value, dict) or not value:
        raise OnnxMetadataError("ONNX metadata 'names' is not a non-empty dict of class id to name")
    if sorted(value) != list(range(len(value))):
        raise OnnxMetadataError("ONNX metadata 'names' class ids are not 0..n-1")
    return [str(value[i]) for i in range(len(value))]


def parse_imgsz(text: str) -> int:
    """``"[160, 160]"`` or ``"160"`` → ``160``; a non-square size is refused (InputSpec is square)."""
    value = _literal(text, "imgsz")
    if isinstance(value, int):
        value = [value, value]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise OnnxMetadataError(f"ONNX metadata 'imgsz' is not [h, w]: {text[:80]!r}")
    if value[0] != value[1]:
        raise OnnxMetadataError(f"ONNX model input {value[0]}x{value[1]} is not square; pass --imgsz")
    return int(value[0])
