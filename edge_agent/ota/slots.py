"""Model slots: one folder per version; ``active`` and ``candidate`` are symlinks switched by
an atomic rename, so a power cut leaves either the old or the new link, never none."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from firmware_bundles import BundleManifest
from firmware_bundles.fsutil import fsync_dir


class ModelSlots:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)

    def slot(self, version: int) -> Path:
        return self.versions / f"{version:06d}"

    def has(self, version: int) -> bool:
        return (self.slot(version) / "manifest.json").exists()

    def manifest(self, version: int) -> BundleManifest:
        return BundleManifest.model_validate_json((self.slot(version) / "manifest.json").read_text())

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

    def remove(self, version: int) -> None:
        if version not in {self.active(), self.previous()}:
            shutil.rmtree(self.slot(version), ignore_errors=True)

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` versions (and always active/previous/candidate) for instant rollback."""
        pinned = {self.active(), self.previous(), self.candidate()}
        installed = sorted(int(p.name) for p in self.versions.iterdir() if p.name.isdigit())
        for version in installed[:-keep] if keep else installed:
            if version not in pinned:
                shutil.rmtree(self.slot(version), ignore_errors=True)
