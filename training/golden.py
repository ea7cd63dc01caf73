"""The golden set: a fixed, versioned evaluation set every candidate model is judged on.

It is generated once per ``(seed, n, imgsz)`` from the ``base`` scenario, from an index range no
training set or edge agent uses, and stored with a ``manifest.json`` of each file's sha256.
Its ``version`` is a content hash of the generator version and the parameters, so two machines
that agree on the version evaluate on byte-identical files (:func:`verify_manifest` checks).

:func:`ensure_eval_set` builds the same kind of fixed set for a shifted scenario (the
"does the new model handle line B" number), also from a reserved index range.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from firmware_bundles import sha256_file
from training import synth

#: First frame index of golden sets; agents stream from 0 and training sets use low ranges.
GOLDEN_INDEX_START = 90_000_000
#: First frame index of shifted evaluation sets.
EVAL_INDEX_START = 80_000_000
GOLDEN_SCENARIO = "base"


@dataclass(frozen=True)
class GoldenSet:
    """A fixed evaluation set on disk (golden, or a shifted evaluation set)."""

    root: Path
    data_yaml: Path
    version: str
    manifest: Path
    scenario: str
    seed: int
    n: int
    imgsz: int

    @property
    def images_dir(self) -> Path:
        return self.root / "images" / "val"



def set_version(kind: str, scenario: str, seed: int, n: int, imgsz: int, index_start: int) -> str:
    params = {
        "generator": synth.GENERATOR_VERSION,
        "classes": synth.CLASS_NAMES,
        "kind": kind,
        "scenario": scenario,
        "seed": seed,
        "n": n,
        "imgsz": imgsz,
        "index_start": index_start,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    prefix = "golden" if kind == "golden" else f"eval-{scenario}"
    return f"{prefix}-s{seed}-n{n}-{imgsz}-{digest}"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (so two processes do not build the same cache entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def verify_manifest(root: Path) -> bool:
    """True when ``root/manifest.json`` exists and every file it lists has its recorded sha256."""
    mf = root / "manifest.json"
    if not mf.is_file():
        return False
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (ValueError, KeyError):
        return False
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True


def _build(
    kind: str, cache_dir: Path, scenario: str, seed: int, n: int, imgsz: int, index_start: int
) -> GoldenSet:
    synth.get_scenario(scenario)
    if n <= 0:
        raise ValueError("n must be positive")
    version = set_version(kind, scenario, seed, n, imgsz, index_start)
    base = Path(cache_dir).resolve() / ("golden" if kind == "golden" else "eval")
    root = base / version
    with file_lock(base / f".{version}.lock"):
        if not verify_manifest(root):
            tmp = base / f".{version}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            img_dir, lbl_dir = tmp / "images" / "val", tmp / "labels" / "val"
            img_dir.mkdir(parents=True)
            lbl_dir.mkdir(parents=True)
            files: dict[str, str] = {}
            for index in range(index_start, index_start + n):
                img, labels = synth.render_frame(scenario, seed, index, imgsz)
                stem = f"{kind}_{index - index_start:05d}"
                (img_dir / f"{stem}.jpg").write_bytes(synth.encode_jpeg(img))
                (lbl_dir / f"{stem}.txt").write_text(synth.format_labels(labels))
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    files[p.relative_to(tmp).as_posix()] = sha256_file(p)
            content = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
            manifest = {
                "version": version,
                "kind": kind,
                "generator_version": synth.GENERATOR_VERSION,
                "scenario": scenario,
                "seed": seed,
                "n": n,
                "imgsz": imgsz,
                "index_start": index_start,
                "classes": synth.CLASS_NAMES,
                "content_sha256": content,
                "files": files,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        # data.yaml carries absolute paths: (re)write it so a moved cache still works. It is not in
        # the manifest for that reason.
        images = root / "images" / "val"
        data_yaml = synth.write_data_yaml(root, [images], [images], synth.CLASS_NAMES)
    return GoldenSet(
        root=root,
        data_yaml=data_yaml,
        version=version,
        manifest=root / "manifest.json",
        scenario=scenario,
        seed=seed,
        n=n,
        imgsz=imgsz,
    )


def ensure_golden_set(cache_dir: Path, seed: int = 7, n: int = 200, imgsz: int = 160) -> GoldenSet:
    """The golden set under ``cache_dir/golden/<version>``, generated (and verified) on demand."""
    return _build("golden", cache_dir, GOLDEN_SCENARIO, seed, n, imgsz, GOLDEN_INDEX_START)


def ensure_eval_set(
    cache_dir: Path, scenario: str, seed: int = 7, n: int = 200, imgsz: int = 160
) -> GoldenSet:
    """A fixed evaluation set of ``scenario`` (e.g. the default shift), disjoint from streamed frames."""
    return _build("eval", cache_dir, scenario, seed, n, imgsz, EVAL_INDEX_START)
