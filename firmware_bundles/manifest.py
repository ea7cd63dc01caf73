"""The bundle manifest: what a bundle holds, how to run it, and who signed it.

The signature covers ``canonical_bytes()`` (sorted keys, no whitespace, ASCII), and
the archive stores exactly those bytes as ``manifest.json``, so a verifier checks the
signature over the bytes it is about to parse and nothing is re-serialised in between.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
# Names the unpacked slot uses for itself; a bundle file may not take them.
RESERVED_FILE_NAMES = frozenset({"manifest.json", "manifest.sig"})
DEFAULT_MIN_AGENT_VERSION = "0.1.0"

Role = Literal["model.onnx", "model.engine", "labels", "extra"]
# Which file role each runtime kind loads.
RUNTIME_ROLE: dict[str, str] = {"onnx": "model.onnx", "tensorrt": "model.engine"}

_SHA256_RE = r"^[0-9a-f]{64}$"
_KEY_ID_RE = r"^[0-9a-f]{16}$"
# Model names end up in slot folders and object keys, so keep them path-safe.
_MODEL_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Dotted integers only, so an agent compares versions as int tuples without `packaging`.
_VERSION_RE = r"^\d+(\.\d+){0,3}$"


def check_relative_path(path: str) -> str:
    """Return ``path`` if it is a plain relative POSIX path, else raise ValueError saying why."""
    if not path:
        raise ValueError("empty path")
    if "\\" in path or any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        raise ValueError(f"path {path!r} contains a backslash or control character")
    if path.startswith("/"):
        raise ValueError(f"path {path!r} is absolute")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"path {path!r} has an empty, '.' or '..' component")
    return path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HardwareTarget(_Strict):
    """The device class a TensorRT engine was built for (engines are not portable)."""

    gpu_compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    tensorrt_version: str = Field(pattern=_VERSION_RE)


class FileEntry(_Strict):
    """One payload file, stored in the archive as ``files/<path>``."""

    path: str = Field(max_length=255)
    sha256: str = Field(pattern=_SHA256_RE)
    size: int = Field(ge=0)
    role: Role = "extra"

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        check_relative_path(value)
        if value in RESERVED_FILE_NAMES:
            raise ValueError(f"{value!r} is reserved for the manifest")
        return value


class RuntimeEntry(_Strict):
    """A way to run the model: which file, which runtime, at which precision."""

    kind: Literal["onnx", "tensorrt"]
    file: str
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    target: HardwareTarget | None = None

    @model_validator(mode="after")
    def _engine_needs_target(self) -> RuntimeEntry:
        if self.kind == "tensorrt" and self.target is None:
            raise ValueError("a tensorrt runtime needs a target (gpu_compute_capability, tensorrt_version)")
        return self


class InputSpec(_Strict):
    """How frames must be prepared before they reach the model."""

    imgsz: int = Field(gt=0, le=8192)
    channels: Literal[1, 3] = 3
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    format: Literal["RGB", "BGR", "GRAY"] = "RGB"
    normalize: Literal["0-1", "0-255", "imagenet"] = "0-1"
    letterbox: bool = True


class Lineage(_Strict):
    """Where the model came from; all optional so hand-built bundles stay possible."""

    snapshot_id: str | None = None
    parent_version: int | None = Field(default=None, ge=1)
    job_id: str | None = None
    model_name: str | None = None


class BundleManifest(_Strict):
    """The signed description of a bundle (``manifest.json``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    model_name: str = Field(pattern=_MODEL_NAME_RE)
    version: int = Field(ge=1)
    created_at: AwareDatetime
    files: list[FileEntry] = Field(min_length=1)
    runtimes: list[RuntimeEntry] = Field(min_length=1)
    input: InputSpec
    class_names: list[str] = Field(min_length=1)
    min_agent_version: str = Field(default=DEFAULT_MIN_AGENT_VERSION, pattern=_VERSION_RE)
    lineage: Lineage = Field(default_factory=Lineage)
    key_id: str = Field(pattern=_KEY_ID_RE)
    metrics: dict[str, FiniteFloat] = Field(default_factory=dict)
    hardware_targets: list[HardwareTarget] = Field(default_factory=list)

    @field_validator("created_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        # One representation per instant, or the canonical bytes would depend on the builder's zone.
        return value.astimezone(UTC)

    @field_validator("class_names")
    @classmethod
    def _check_class_names(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("class names must be non-empty")
        return value

    @model_validator(mode="after")
    def _check_references(self) -> BundleManifest:
        paths = [entry.path for entry in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("file paths must be unique")
        # "a" and "a/b" cannot both exist once unpacked (a file cannot also be a folder).
        as_dirs = {str(parent) for p in paths for parent in PurePosixPath(p).parents}
        clash = sorted(as_dirs.intersection(paths))
        if clash:
            raise ValueError(f"file path {clash[0]!r} is also used as a folder")
        roles = {entry.path: entry.role for entry in self.files}
        for runtime in self.runtimes:
            if runtime.file not in roles:
                raise ValueError(f"runtime {runtime.kind} refers to {runtime.file!r}, which is not in files")
            if roles[runtime.file] != RUNTIME_ROLE[runtime.kind]:
                raise ValueError(
                    f"runtime {runtime.kind} needs a file with role {RUNTIME_ROLE[runtime.kind]!r}, "
                    f"{runtime.file!r} has role {roles[runtime.file]!r}"
                )
        return self

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed and stored as ``manifest.json``."""
        return canonical_json(self.model_dump(mode="json"))

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)


def canonical_json(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def agent_version_tuple(version: str) -> tuple[int, ...]:
    """``"1.2"`` → ``(1, 2, 0, 0)``, for comparing an agent against ``min_agent_version``."""
    if not re.fullmatch(_VERSION_RE, version):
        raise ValueError(f"not a dotted version: {version!r}")
    parts = [int(part) for part in version.split(".")]
    # Padded so "1.2" and "1.2.0" compare equal.
    return tuple(parts + [0] * (4 - len(parts)))
