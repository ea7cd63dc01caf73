"""Model slots: one folder per version; ``active`` and ``candidate`` are symlinks switched by
an atomic rename, so a power cut leaves either the old or the new link, never none."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from pydantic import ValidationError

from firmware_bundles import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleManifest,
    FileMismatch,
    FileMissing,
    ManifestInvalid,
    SignatureMissing,
    TrustStore,
    check_signature,
    sha256_file,
)
from firmware_bundles.fsutil import fsync_dir

_LINKS = ("active", "previous", "candidate")


class ModelSlots:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)
        self._sweep()

    def _sweep(self) -> None:
        """Remove what a crash can leave: half-unpacked slot folders and half-made links."""
        for leftover in self.versions.glob(".*.unpack-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for name in _LINKS:
            (self.root / f".{name}.tmp").unlink(missing_ok=True)

    def slot(self, version: int) -> Path:
        return self.versions / f"{version:06d}"

    def has(self, version: int) -> bool:
        return (self.slot(version) / "manifest.json").exists()

    def manifest(self, version: int) -> BundleManifest:
        return BundleManifest.model_validate_json((self.slot(version) / "manifest.json").read_text())

    def installed(self) -> list[int]:
        """Versions with a complete slot, oldest first."""
        return sorted(int(p.name) for p in self.versions.iterdir() if p.name.isdigit() and self.has(int(p.name)))

    def newest_below(self, version: int) -> int | None:
        older = [v for v in self.installed() if v < version]
        return older[-1] if older else None

    def verify(self, version: int, trust: TrustStore) -> BundleManifest:
        """Check a slot is still exactly what was verified at install: signed manifest, every file's
        size and sha256. Raises a ``BundleError`` subclass saying what is wrong."""
        slot = self.slot(version)
        try:
            raw = (slot / MANIFEST_NAME).read_bytes()
        except OSError:
            raise FileMissing(f"slot {version} has no {MANIFEST_NAME}") from None
        try:
            signature = (slot / SIGNATURE_NAME).read_bytes()
        except OSError:
            raise SignatureMissing(f"slot {version} has no {SIGNATURE_NAME}") from None
        try:
            manifest = BundleManifest.model_validate_json(raw)
        except ValidationError as exc:
            raise ManifestInvalid(f"slot {version} manifest is invalid: {exc.errors()[0]['msg']}") from None
        if manifest.canonical_bytes() != raw:
            raise ManifestInvalid(f"slot {version} manifest is not in canonical form")
        check_signature(manifest, raw, signature, trust)
        if manifest.version != version:
            raise ManifestInvalid(f"slot {version} holds version {manifest.version}")
        for entry in manifest.files:
            path = slot / entry.path
            try:
                info = path.lstat()
            except OSError:
                raise FileMissing(f"slot {version} is missing {entry.path}") from None
            if not stat.S_ISREG(info.st_mode):
                raise FileMismatch(f"slot {version}: {entry.path} is not a regular file")
            if info.st_size != entry.size or sha256_file(path) != entry.sha256:
                raise FileMismatch(f"slot {version}: {entry.path} differs from its signed manifest")
        return manifest

    def model_path(self, version: int) -> Path:
        manifest = self.manifest(version)
        onnx = [f.path for f in manifest.files if f.path.endswith(".onnx")]
        if not onnx:
            raise FileNotFoundError(f"bundle {version} ships no ONNX model")
        return self.slot(version) / onnx[0]

    def _link(self, name: str, version: int | None) -> None:
        link = self.root / name
        if version is None:
            link.unlink(missing_ok=True)
            return
        tmp = self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(self.slot(version), self.root), tmp)
        os.replace(tmp, link)  # atomic on POSIX
        fsync_dir(self.root)

    def _read(self, name: str) -> int | None:
        link = self.root / name
        if not link.is_symlink():
            return None
        target = Path(os.readlink(link)).name
        try:
            version = int(target)
        except ValueError:
            return None
        return version if self.has(version) else None

    def active(self) -> int | None:
        return self._read("active")

    def candidate(self) -> int | None:
        return self._read("candidate")

    def set_active(self, version: int) -> None:
        previous = self.active()
        if previous is not None and previous != version:
            self._link("previous", previous)
        self._link("active", version)

    def previous(self) -> int | None:
        return self._read("previous")

    def set_candidate(self, version: int | None) -> None:
        self._link("candidate", version)

    def delete(self, version: int) -> None:
        """Remove a slot folder; renamed aside first, so a crash mid-delete never leaves a half slot."""
        slot = self.slot(version)
        if not slot.exists():
            return
        trash = self.versions / f".{slot.name}.unpack-deleted"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(slot, trash)
        fsync_dir(self.versions)
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, version: int) -> None:
        if version not in {self.active(), self.previous()}:
            self.delete(version)

    def forget(self, version: int) -> None:
        """Delete a version that proved bad, unpinning it as ``previous`` (never the active one)."""
        if version == self.active():
            return
        if self.previous() == version:
            self._link("previous", None)
        if self.candidate() == version:
            self._link("candidate", None)
        self.delete(version)

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` versions (and always active/previous/candidate) for instant rollback."""
        pinned = {self.active(), self.previous(), self.candidate()}
        installed = sorted(int(p.name) for p in self.versions.iterdir() if p.name.isdigit())
        for version in installed[:-keep] if keep else installed:
            if version not in pinned:
                self.delete(version)
