"""Build a signed bundle from model files and manifest fields."""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from firmware_bundles.archive import hash_stream, write_archive
from firmware_bundles.errors import FileMissing, ManifestInvalid
from firmware_bundles.keys import key_id
from firmware_bundles.manifest import (
    DEFAULT_MIN_AGENT_VERSION,
    BundleManifest,
    FileEntry,
    HardwareTarget,
    InputSpec,
    Lineage,
    RuntimeEntry,
)
from firmware_bundles.reader import describe_validation_error

_ROLE_BY_SUFFIX = {".onnx": "model.onnx", ".engine": "model.engine", ".plan": "model.engine"}


def infer_role(name: str) -> str:
    """Role from the archive name: ``.onnx``, ``.engine``/``.plan``, ``labels*``, else ``extra``."""
    path = PurePosixPath(name)
    if path.suffix.lower() in _ROLE_BY_SUFFIX:
        return _ROLE_BY_SUFFIX[path.suffix.lower()]
    if path.name.lower().startswith("labels"):
        return "labels"
    return "extra"


def _hash_source(name: str, source: Path) -> tuple[str, int]:
    try:
        with open(source, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise FileMissing(f"source for {name!r} is not a regular file: {source}")
            return hash_stream(handle)
    except FileNotFoundError:
        raise FileMissing(f"source for {name!r} not found: {source}") from None
    except IsADirectoryError:
        raise FileMissing(f"source for {name!r} is a directory: {source}") from None


def sign_manifest(manifest: BundleManifest, private_key: Ed25519PrivateKey) -> bytes:
    """Raw 64-byte ed25519 signature over the canonical manifest bytes."""
    if key_id(private_key.public_key()) != manifest.key_id:
        raise ValueError("manifest.key_id does not match the signing key")
    return private_key.sign(manifest.canonical_bytes())


def build_bundle(
    out_path: str | os.PathLike[str],
    files: Mapping[str, str | os.PathLike[str]],
    *,
    private_key: Ed25519PrivateKey,
    model_name: str,
    version: int,
    class_names: Sequence[str],
    input_spec: InputSpec | int,
    runtimes: Sequence[RuntimeEntry] | None = None,
    roles: Mapping[str, str] | None = None,
    min_agent_version: str = DEFAULT_MIN_AGENT_VERSION,
    lineage: Lineage | None = None,
    metrics: Mapping[str, float] | None = None,
    hardware_targets: Sequence[HardwareTarget] | None = None,
    created_at: datetime | None = None,
) -> BundleManifest:
    """Hash ``files`` (archive name → source path), sign the manifest, write the bundle atomically.

    ``input_spec`` may be just the image size. Roles default from file names
    (``infer_role``); runtimes default to one fp32 ONNX runtime per ``.onnx`` file, and
    must be given for TensorRT engines, which need their hardware target.
    ``hardware_targets`` defaults to the runtimes' targets. Pass ``created_at`` for
    byte-identical rebuilds.
    """
    roles = dict(roles or {})
    sources = {name: Path(src) for name, src in files.items()}
    entries = []
    for name in sorted(sources):
        sha256, size = _hash_source(name, sources[name])
        entries.append(
            {"path": name, "sha256": sha256, "size": size, "role": roles.get(name, infer_role(name))}
        )
    if runtimes is None:
        if any(entry["role"] == "model.engine" for entry in entries):
            raise ValueError("a TensorRT engine needs an explicit RuntimeEntry with its hardware target")
        runtimes = [RuntimeEntry(kind="onnx", file=e["path"]) for e in entries if e["role"] == "model.onnx"]
    if hardware_targets is None:
        hardware_targets = list(dict.fromkeys(r.target for r in runtimes if r.target is not None))
    try:
        manifest = BundleManifest(
            model_name=model_name,
            version=version,
            # Whole seconds: sub-second precision only makes rebuilds differ.
            created_at=created_at or datetime.now(UTC).replace(microsecond=0),
            files=[FileEntry.model_validate(e) for e in entries],
            runtimes=list(runtimes),
            input=input_spec if isinstance(input_spec, InputSpec) else InputSpec(imgsz=input_spec),
            class_names=list(class_names),
            min_agent_version=min_agent_version,
            lineage=lineage or Lineage(),
            key_id=key_id(private_key.public_key()),
            metrics=dict(metrics or {}),
            hardware_targets=list(hardware_targets),
        )
    except ValidationError as exc:
        raise ManifestInvalid(f"cannot build manifest: {describe_validation_error(exc)}") from None
    signature = sign_manifest(manifest, private_key)
    write_archive(
        out_path,
        manifest.canonical_bytes(),
        signature,
        [(entry, functools.partial(open, sources[entry.path], "rb")) for entry in manifest.files],
    )
    return manifest
