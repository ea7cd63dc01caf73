"""What is in a bundle, for display, without needing any trusted key.

Named ``summary`` rather than ``inspect`` so it never shadows the standard library module.
The signature is reported as present or not, never as valid: that takes ``verify_bundle``.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict

from firmware_bundles.errors import BundleError, SignatureInvalid, SignatureMissing
from firmware_bundles.manifest import BundleManifest
from firmware_bundles.reader import DEFAULT_MAX_BYTES, BundleReader


class BundleSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int
    sha256: str
    key_id: str
    signature_present: bool
    # "ok" when every file matches the manifest and nothing else is in the archive, else the reason.
    integrity: str
    manifest: BundleManifest

    @property
    def intact(self) -> bool:
        return self.integrity == "ok" and self.signature_present


def inspect_bundle(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> BundleSummary:
    """Summarise a bundle; raises ``BundleError`` only when there is no readable manifest to show."""
    with BundleReader(path, max_bytes=max_bytes) as reader:
        manifest, _ = reader.read_manifest()
        try:
            reader.read_signature()
            signature_present = True
        except (SignatureMissing, SignatureInvalid):
            signature_present = False
        try:
            reader.check_files(manifest)
            reader.check_no_extras(manifest)
            integrity = "ok"
        except BundleError as exc:
            integrity = str(exc)
        return BundleSummary(
            path=str(path),
            size=reader.size,
            sha256=reader.file_sha256(),
            key_id=manifest.key_id,
            signature_present=signature_present,
            integrity=integrity,
            manifest=manifest,
        )


def summary_rows(summary: BundleSummary) -> list[tuple[str, str]]:
    """Label/value pairs for a human-readable table."""
    m = summary.manifest
    rows = [
        ("bundle", summary.path),
        ("size", f"{summary.size} bytes"),
        ("sha256", summary.sha256),
        ("model", f"{m.model_name} v{m.version}"),
        ("created", m.created_at.isoformat()),
        ("key id", summary.key_id + ("" if summary.signature_present else " (no valid signature present)")),
        ("integrity", summary.integrity),
        ("min agent", m.min_agent_version),
        (
            "input",
            f"{m.input.imgsz}px {m.input.channels}ch {m.input.layout} {m.input.format} "
            f"norm {m.input.normalize}{' letterbox' if m.input.letterbox else ''}",
        ),
        ("classes", f"{len(m.class_names)}: {', '.join(m.class_names)}"),
    ]
    for runtime in m.runtimes:
        target = (
            f" for sm {runtime.target.gpu_compute_capability}, TensorRT {runtime.target.tensorrt_version}"
            if runtime.target
            else ""
        )
        rows.append(("runtime", f"{runtime.kind} {runtime.precision} {runtime.file}{target}"))
    for entry in m.files:
        rows.append(("file", f"{entry.path} [{entry.role}] {entry.size} bytes sha256 {entry.sha256[:16]}..."))
    lineage = {k: v for k, v in m.lineage.model_dump().items() if v is not None}
    if lineage:
        rows.append(("lineage", ", ".join(f"{k}={v}" for k, v in lineage.items())))
    if m.metrics:
        rows.append(("metrics", ", ".join(f"{k}={v:g}" for k, v in sorted(m.metrics.items()))))
    return rows
