"""Packs a model into a signed OTA bundle, stores its artifacts and records it in the registry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.orm import Session, sessionmaker

from firmware_bundles import (
    Lineage,
    RuntimeEntry,
    build_bundle,
    generate_private_key,
    load_private_key,
    save_private_key,
    save_public_key,
    sha256_file,
)
from server import audit, metrics, registry
from server.db.models import ModelVersion

log = structlog.get_logger(__name__)

# push(bundle_path, ref, *, insecure) -> an object with ``manifest_digest`` (firmware_bundles.oci_registry.push).
OciPush = Callable[..., Any]


def ensure_signing_key(path: Path):
    """Load the server's ed25519 signing key, creating it (0600) and its public half on first start."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = generate_private_key()
        save_private_key(key, path)
        save_public_key(key.public_key(), public_key_path(path))
    return load_private_key(path)


def public_key_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.stem + ".pub.pem")


class ModelPublisher:
    """Builds, stores and registers versions; with ``oci_registry`` set (``HOST[:PORT]/NAMESPACE``) every
    registered version's bundle is also pushed to ``<oci_registry>/<model_name>:<version>``.

    The object store is the first transport: a failed OCI push does not fail the registration. The
    version is registered with ``oci_image`` None, the failure is logged (``publish.oci_push_failed``)
    and counted (``edgeloop_oci_push_total{outcome="failed"}``); nothing retries it later.
    """

    def __init__(self, sessions: sessionmaker[Session], store, private_key, model_name: str,
                 class_names: list[str], *, oci_registry: str = "", oci_insecure: bool = False,
                 oci_push: OciPush | None = None) -> None:
        self._sessions = sessions
        self._store = store
        self._key = private_key
        self._model_name = model_name
        self._class_names = list(class_names)
        self._oci_registry = oci_registry.strip().rstrip("/")
        self._oci_insecure = oci_insecure
        self._oci_push = oci_push

    def push_oci(self, version: int, bundle: Path) -> str | None:
        """Push the signed bundle as an OCI image; its digest reference (``host/ns/name@sha256:...``),
        or None when no registry is configured or the push failed (logged and counted, never raised)."""
        if not self._oci_registry:
            return None
        ref = f"{self._oci_registry}/{self._model_name}:{version}"
        try:
            from firmware_bundles.oci_registry import ImageRef  # needs httpx: imported only when configured

            push = self._oci_push
            if push is None:
                from firmware_bundles.oci_registry import push
            target = ImageRef.parse(ref)
            result = push(bundle, target, insecure=self._oci_insecure)
            digest = result.manifest_digest
            image = str(ImageRef(target.host, target.name, digest=digest))
        except Exception as exc:  # noqa: BLE001 - the version must be registered whatever the registry did
            metrics.OCI_PUSHES.labels(outcome="failed").inc()
            log.warning("publish.oci_push_failed", version=version, ref=ref, error=str(exc),
                        error_type=type(exc).__name__, status=getattr(exc, "status", None),
                        code=getattr(exc, "code", None))
            return None
        metrics.OCI_PUSHES.labels(outcome="pushed").inc()
        log.info("publish.oci_pushed", version=version, ref=ref, image=image)
        return image

    def build(self, *, onnx: Path, version: int, out: Path, imgsz: int, lineage: dict,
              metrics: dict[str, float], int8_onnx: Path | None = None) -> tuple[Path, str, int]:
        """The signed bundle: the fp32 ONNX, plus the INT8 ONNX when it passed its golden-set gate."""
        files = {"model.onnx": onnx}
        runtimes = [RuntimeEntry(kind="onnx", file="model.onnx", precision="fp32")]
        if int8_onnx is not None:
            files["model.int8.onnx"] = int8_onnx
            runtimes.append(RuntimeEntry(kind="onnx", file="model.int8.onnx", precision="int8"))
        build_bundle(
            out, files, model_name=self._model_name, version=version,
            class_names=self._class_names, input_spec=imgsz, private_key=self._key,
            lineage=Lineage(**lineage), metrics=metrics, runtimes=runtimes,
        )
        return out, sha256_file(out), out.stat().st_size

    def upload(self, version: int, *, pt: Path, onnx: Path, bundle: Path) -> dict[str, str]:
        keys = {
            "pt_key": registry.artifact_key(self._model_name, version, "model.pt"),
            "onnx_key": registry.artifact_key(self._model_name, version, "model.onnx"),
            "bundle_key": registry.artifact_key(self._model_name, version, "bundle.tar"),
        }
        self._store.put_file(keys["pt_key"], pt)
        self._store.put_file(keys["onnx_key"], onnx)
        self._store.put_file(keys["bundle_key"], bundle)
        return keys

    def register_external(self, *, pt: Path, onnx: Path, imgsz: int, metrics: dict, hyperparameters: dict,
                          actor: str, source: str, work_dir: Path) -> int:
        """Register a model trained outside the pipeline (the seed) and make it production."""
        with self._sessions() as session:
            version = registry.next_version(session)
            session.add(ModelVersion(version=version, name=self._model_name, status="candidate",
                                     metrics=metrics, hyperparameters=hyperparameters,
                                     class_names=self._class_names, imgsz=imgsz, reason=f"registered by {actor}"))
            session.commit()
        flat = {f"{k}.{m}": v[m] for k, v in metrics.items() if isinstance(v, dict)
                for m in ("map50", "map50_95") if m in v}
        bundle, sha, size = self.build(onnx=onnx, version=version, out=work_dir / "bundle.tar", imgsz=imgsz,
                                       lineage={"model_name": self._model_name}, metrics=flat)
        keys = self.upload(version, pt=pt, onnx=onnx, bundle=bundle)
        oci_image = self.push_oci(version, bundle)
        with self._sessions() as session:
            mv = session.get(ModelVersion, version)
            for key, value in keys.items():
                setattr(mv, key, value)
            mv.bundle_sha256, mv.bundle_size = sha, size
            mv.oci_image = oci_image
            registry.approve(session, version, actor)  # registering an external model is its approval
            audit.record(session, actor, "model.register", f"version:{version}", source)
            session.commit()
        return version
