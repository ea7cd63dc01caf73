"""Packs a model into a signed OTA bundle, stores its artifacts and records it in the registry."""

from __future__ import annotations

from pathlib import Path

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
from server import audit, registry
from server.db.models import ModelVersion


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
    def __init__(self, sessions: sessionmaker[Session], store, private_key, model_name: str,
                 class_names: list[str]) -> None:
        self._sessions = sessions
        self._store = store
        self._key = private_key
        self._model_name = model_name
        self._class_names = list(class_names)

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
        with self._sessions() as session:
            mv = session.get(ModelVersion, version)
            for key, value in keys.items():
                setattr(mv, key, value)
            mv.bundle_sha256, mv.bundle_size = sha, size
            registry.approve(session, version, actor)  # registering an external model is its approval
            audit.record(session, actor, "model.register", f"version:{version}", source)
            session.commit()
        return version
