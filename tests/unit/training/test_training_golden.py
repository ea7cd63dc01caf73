"""Golden set: stable version, manifest hashes that match, identical on regeneration."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from firmware_bundles import sha256_file
from training import golden, synth


def test_golden_set_is_versioned_and_reproducible(tmp_path: Path) -> None:
    g = golden.ensure_golden_set(tmp_path / "a", seed=7, n=12, imgsz=96)
    assert g.version.startswith("golden-s7-n12-96-")
    assert len(g.version.rsplit("-", 1)[1]) == 8
    assert g.version == golden.set_version("golden", "base", 7, 12, 96, golden.GOLDEN_INDEX_START)

    manifest = json.loads(g.manifest.read_text())
    assert manifest["version"] == g.version
    assert manifest["generator_version"] == synth.GENERATOR_VERSION
    images = [k for k in manifest["files"] if k.endswith(".jpg")]
    labels = [k for k in manifest["files"] if k.endswith(".txt")]
    assert len(images) == 12 and len(labels) == 12
    assert golden.verify_manifest(g.root)
    for rel, digest in manifest["files"].items():
        assert sha256_file(g.root / rel) == digest

    cfg = yaml.safe_load(g.data_yaml.read_text())
    assert cfg["val"] == [str(g.images_dir)]

    # Regenerating elsewhere gives the same version and byte-identical files.
    h = golden.ensure_golden_set(tmp_path / "b", seed=7, n=12, imgsz=96)
    assert h.version == g.version
    assert json.loads(h.manifest.read_text())["files"] == manifest["files"]
    assert json.loads(h.manifest.read_text())["content_sha256"] == manifest["content_sha256"]

    # Asking again reuses the set (no rewrite).
    before = g.manifest.stat().st_mtime_ns
    again = golden.ensure_golden_set(tmp_path / "a", seed=7, n=12, imgsz=96)
    assert again.version == g.version and g.manifest.stat().st_mtime_ns == before


def test_tampered_golden_set_is_rebuilt(tmp_path: Path) -> None:
    g = golden.ensure_golden_set(tmp_path, seed=7, n=4, imgsz=64)
    victim = sorted(g.images_dir.glob("*.jpg"))[0]
    original = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    assert not golden.verify_manifest(g.root)
    golden.ensure_golden_set(tmp_path, seed=7, n=4, imgsz=64)
    assert victim.read_bytes() == original
    assert golden.verify_manifest(g.root)


def test_params_change_the_version(tmp_path: Path) -> None:
    v = golden.set_version("golden", "base", 7, 200, 160, golden.GOLDEN_INDEX_START)
    assert v != golden.set_version("golden", "base", 8, 200, 160, golden.GOLDEN_INDEX_START)
    assert v != golden.set_version("golden", "base", 7, 201, 160, golden.GOLDEN_INDEX_START)
    assert v != golden.set_version("golden", "base", 7, 200, 256, golden.GOLDEN_INDEX_START)


def test_eval_set_is_shifted_and_disjoint(tmp_path: Path) -> None:
    e = golden.ensure_eval_set(tmp_path, synth.DEFAULT_SHIFT, seed=7, n=5, imgsz=96)
    assert e.version.startswith(f"eval-{synth.DEFAULT_SHIFT}-s7-n5-96-")
    assert e.scenario == synth.DEFAULT_SHIFT
    assert golden.verify_manifest(e.root)
    # Its frames come from a reserved index range, so agents streaming from 0 never send them.
    first = sorted(e.images_dir.glob("*.jpg"))[0]
    img, _ = synth.render_frame(synth.DEFAULT_SHIFT, 7, golden.EVAL_INDEX_START, 96)
    assert first.read_bytes() == synth.encode_jpeg(img)
    assert golden.EVAL_INDEX_START != golden.GOLDEN_INDEX_START
