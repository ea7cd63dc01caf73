"""Registered versions pushed to a real OCI registry (Debian's docker-registry) through the server's
publisher, wired from settings (EDGELOOP_OCI_REGISTRY) by build_context, on real SeaweedFS and SQLite:
the seed (register_external) and a pipeline-registered candidate are pulled back by the digest recorded
on their version, byte-identical to the bundle in the object store, and verify against the server's
key. With the registry unreachable the candidate is still registered, without an image, and counted.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from oci_registry_kit import Registry, module_registry
from test_retrain_pipeline import GOOD, StandInExecutor, _add_samples, make_context

from firmware_bundles import TrustStore, load_public_key, sha256_file
from firmware_bundles.oci_registry import ImageRef, pull
from server import metrics
from server.db.models import ModelVersion, TrainingJob
from server.pipeline.runner import RetrainRunner
from server.publish import public_key_path
from server.stack.ports import find_free_port

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    yield from module_registry(tmp_path_factory)


def _context(seaweedfs, tmp_path: Path, tiny_onnx, oci_registry: str):
    return make_context(seaweedfs, tmp_path, tiny_onnx, oci_registry=oci_registry,
                        model_name=f"detector-{uuid.uuid4().hex[:6]}")


def _run_pipeline(ctx, tiny_onnx) -> TrainingJob:
    _add_samples(ctx, 20)
    with ctx.sessions() as session:
        job = TrainingJob(trigger="manual", reason="test")
        session.add(job)
        session.commit()
        job_id = job.id
    RetrainRunner(ctx.settings, ctx.sessions, ctx.store, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD),
                  ctx.publisher, alerts=ctx.alerts).run(job_id)
    with ctx.sessions() as session:
        return session.get(TrainingJob, job_id)


def _check_image(ctx, mv: ModelVersion, registry: Registry, tmp_path: Path) -> None:
    ref = ImageRef.parse(mv.oci_image)
    assert ref.host == registry.host and ref.name == f"edgeloop/{ctx.settings.model_name}"
    assert ref.tag is None and ref.digest is not None and ref.digest.startswith("sha256:")
    stored = tmp_path / f"stored-{mv.version}.tar"
    ctx.store.download_file(mv.bundle_key, stored)
    key = load_public_key(public_key_path(ctx.settings.data_dir / "keys" / "signing-key.pem"))
    pulled = pull(mv.oci_image, tmp_path / f"pulled-{mv.version}.tar", trust=TrustStore([key]))
    assert pulled.verified and pulled.manifest.version == mv.version
    assert pulled.manifest_digest == ref.digest
    assert pulled.bundle_path.read_bytes() == stored.read_bytes()
    assert sha256_file(pulled.bundle_path) == pulled.bundle_sha256 == mv.bundle_sha256
    # The tag <model_name>:<version> points at the same image.
    by_tag = pull(f"{registry.host}/{ref.name}:{mv.version}", tmp_path / f"tag-{mv.version}.tar")
    assert by_tag.manifest_digest == ref.digest


def test_seed_and_pipeline_versions_are_pushed_and_pull_back_identical(
        seaweedfs, registry: Registry, tmp_path, tiny_onnx) -> None:
    pushed_before = metrics.OCI_PUSHES.labels(outcome="pushed")._value.get()
    ctx = _context(seaweedfs, tmp_path, tiny_onnx, f"{registry.host}/edgeloop")
    try:
        with ctx.sessions() as session:
            seed = session.get(ModelVersion, 1)
            assert seed.status == "production" and seed.oci_image
            _check_image(ctx, seed, registry, tmp_path)

        job = _run_pipeline(ctx, tiny_onnx)
        assert job.status == "succeeded", job.log
        with ctx.sessions() as session:
            candidate = session.get(ModelVersion, 2)
            assert candidate.oci_image and candidate.oci_image != seed.oci_image
            _check_image(ctx, candidate, registry, tmp_path)
        assert metrics.OCI_PUSHES.labels(outcome="pushed")._value.get() == pushed_before + 2
    finally:
        ctx.engine.dispose()


def test_unreachable_registry_keeps_the_versions_without_an_image(seaweedfs, tmp_path, tiny_onnx) -> None:
    failed_before = metrics.OCI_PUSHES.labels(outcome="failed")._value.get()
    ctx = _context(seaweedfs, tmp_path, tiny_onnx, f"127.0.0.1:{find_free_port()}/edgeloop")  # nothing listens
    try:
        job = _run_pipeline(ctx, tiny_onnx)
        assert job.status == "succeeded", job.log
        with ctx.sessions() as session:
            for version in (1, 2):
                mv = session.get(ModelVersion, version)
                assert mv.bundle_key and mv.bundle_sha256 and mv.oci_image is None
            assert session.get(ModelVersion, 2).status == "production"
        assert metrics.OCI_PUSHES.labels(outcome="failed")._value.get() == failed_before + 2
    finally:
        ctx.engine.dispose()
