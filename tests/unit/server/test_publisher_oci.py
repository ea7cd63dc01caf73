"""ModelPublisher's OCI push (settings.oci_registry): a registered version's signed bundle is pushed
to <oci_registry>/<model_name>:<version> and its digest reference recorded on the version; a failed
push keeps the version (no image), logs publish.oci_push_failed and counts it; no registry, no push.

The push function is injected (a fake); tests/integration/test_publish_oci.py pushes to a real registry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog.testing

from firmware_bundles import generate_private_key, verify_bundle
from firmware_bundles.oci_registry import ImageRef, OciRegistryError
from server import metrics
from server.api.routes import _model_dict
from server.db.models import ModelVersion
from server.db.session import make_engine, make_session_factory, upgrade_schema
from server.publish import ModelPublisher
from server.settings import ServerSettings

DIGEST = "sha256:" + "ab" * 32


class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_file(self, key: str, path: Path) -> None:
        self.objects[key] = Path(path).read_bytes()


class FakePush:
    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[Path, ImageRef, dict]] = []
        self.error = error

    def __call__(self, bundle_path, ref, **kwargs):
        self.calls.append((Path(bundle_path), ref, kwargs))
        # What the registry would get: the bundle's bytes must be the registered ones.
        self.pushed_bytes = Path(bundle_path).read_bytes()
        if self.error is not None:
            raise self.error
        return SimpleNamespace(manifest_digest=DIGEST)


@pytest.fixture
def sessions(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'edgeloop.db'}")
    upgrade_schema(engine)  # the 0009 migration adds model_versions.oci_image
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def key():
    return generate_private_key()


def _publisher(sessions, key, store, **oci) -> ModelPublisher:
    return ModelPublisher(sessions, store, key, "defect-detector", ["scratch", "dent"], **oci)


def _register(publisher: ModelPublisher, tmp_path: Path) -> int:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (tmp_path / "w.pt").write_bytes(b"weights")
    (tmp_path / "m.onnx").write_bytes(hashlib.sha256(b"onnx").digest() * 64)
    return publisher.register_external(pt=tmp_path / "w.pt", onnx=tmp_path / "m.onnx", imgsz=32, metrics={},
                                       hyperparameters={}, actor="tester", source="test", work_dir=work)


def _count(outcome: str) -> float:
    return metrics.OCI_PUSHES.labels(outcome=outcome)._value.get()


def test_registered_version_is_pushed_with_its_ref_and_the_digest_recorded(sessions, key, tmp_path) -> None:
    store, push = FakeStore(), FakePush()
    publisher = _publisher(sessions, key, store, oci_registry="registry.example.com:5000/edgeloop",
                           oci_insecure=True, oci_push=push)
    pushed_before = _count("pushed")
    version = _register(publisher, tmp_path)

    assert len(push.calls) == 1
    _, ref, kwargs = push.calls[0]
    assert str(ref) == f"registry.example.com:5000/edgeloop/defect-detector:{version}"
    assert kwargs == {"insecure": True}
    with sessions() as session:
        mv = session.get(ModelVersion, version)
        assert mv.status == "production"
        assert mv.oci_image == f"registry.example.com:5000/edgeloop/defect-detector@{DIGEST}"
        # The image pushed is the bundle registered in the object store, byte for byte.
        assert push.pushed_bytes == store.objects[mv.bundle_key]
        assert hashlib.sha256(push.pushed_bytes).hexdigest() == mv.bundle_sha256
        assert _model_dict(mv, {})["oci_image"] == mv.oci_image  # what GET /api/v1/models shows
    assert _count("pushed") == pushed_before + 1
    assert verify_bundle(tmp_path / "work" / "bundle.tar", key.public_key()).version == version


@pytest.mark.parametrize("error", [OciRegistryError("denied", code="DENIED", status=403),
                                   ConnectionRefusedError("connection refused")])
def test_failed_push_keeps_the_version_without_an_image_and_is_logged_and_counted(
        sessions, key, tmp_path, error) -> None:
    store, push = FakeStore(), FakePush(error)
    publisher = _publisher(sessions, key, store, oci_registry="registry.example.com/edgeloop", oci_push=push)
    failed_before, pushed_before = _count("failed"), _count("pushed")
    with structlog.testing.capture_logs() as logs:
        version = _register(publisher, tmp_path)

    assert len(push.calls) == 1
    with sessions() as session:
        mv = session.get(ModelVersion, version)
        assert mv.status == "production" and mv.bundle_key in store.objects and mv.bundle_sha256
        assert mv.oci_image is None
        assert _model_dict(mv, {})["oci_image"] is None
    assert _count("failed") == failed_before + 1
    assert _count("pushed") == pushed_before
    failures = [e for e in logs if e["event"] == "publish.oci_push_failed"]
    assert len(failures) == 1
    assert failures[0]["version"] == version and str(error) in failures[0]["error"]
    assert failures[0]["ref"] == f"registry.example.com/edgeloop/defect-detector:{version}"
    assert failures[0]["log_level"] == "warning"


def test_no_registry_no_push(sessions, key, tmp_path) -> None:
    push = FakePush()
    publisher = _publisher(sessions, key, FakeStore(), oci_push=push)  # oci_registry defaults to ""
    counts = _count("pushed"), _count("failed")
    version = _register(publisher, tmp_path)
    assert push.calls == []
    assert publisher.push_oci(version, tmp_path / "work" / "bundle.tar") is None
    assert push.calls == []
    with sessions() as session:
        assert session.get(ModelVersion, version).oci_image is None
    assert (_count("pushed"), _count("failed")) == counts


def test_a_model_name_that_is_no_image_name_is_a_counted_failure(sessions, key, tmp_path) -> None:
    push = FakePush()
    publisher = ModelPublisher(sessions, FakeStore(), key, "Defect-Detector", ["scratch"],
                               oci_registry="registry.example.com/edgeloop", oci_push=push)
    failed_before = _count("failed")
    version = _register(publisher, tmp_path)
    assert push.calls == []  # refused before any request
    assert _count("failed") == failed_before + 1
    with sessions() as session:
        assert session.get(ModelVersion, version).oci_image is None


def test_settings_from_the_environment(monkeypatch) -> None:
    assert ServerSettings().oci_registry == "" and ServerSettings().oci_insecure is False
    monkeypatch.setenv("EDGELOOP_OCI_REGISTRY", "registry.example.com:5000/edgeloop")
    monkeypatch.setenv("EDGELOOP_OCI_INSECURE", "true")
    settings = ServerSettings()
    assert settings.oci_registry == "registry.example.com:5000/edgeloop"
    assert settings.oci_insecure is True
    monkeypatch.setenv("EDGELOOP_OCI_REGISTRY", "no-namespace")
    with pytest.raises(ValueError, match="oci_registry"):
        ServerSettings()
