"""A training pod's inputs and outputs through the object store (Kubernetes executor).

The server stages everything the job reads into one tar (server.pipeline.k8s_staging) and
the pod shares no disk with it: before the job reads any path, :func:`fetch_inputs`
downloads that tar and extracts it; after the job, :func:`upload_outputs` puts
``result.json`` and the files the result names back, under the spec's ``outputs_uri``.
Credentials come from the pod's environment (``EDGELOOP_S3_*``, from a Kubernetes Secret).
Both are no-ops for the local executor, whose spec has no URIs.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import urlparse


def _client():
    from minio import Minio

    env = os.environ.get
    endpoint = env("EDGELOOP_S3_ENDPOINT")
    if not endpoint:
        raise RuntimeError("EDGELOOP_S3_ENDPOINT is not set: the pod cannot reach the object store")
    return Minio(endpoint, access_key=env("EDGELOOP_S3_ACCESS_KEY", ""), secret_key=env("EDGELOOP_S3_SECRET_KEY", ""),
                 secure=env("EDGELOOP_S3_SECURE", "false").lower() in {"1", "true", "yes"},
                 region=env("EDGELOOP_S3_REGION") or None)


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"expected s3://bucket/key, got {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def fetch_inputs(spec: dict, client=None) -> None:
    if not spec.get("inputs_uri"):
        return
    bucket, key = _split(spec["inputs_uri"])
    dest = Path(spec["inputs_dir"])
    dest.mkdir(parents=True, exist_ok=True)
    client = client or _client()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "inputs.tar"
        client.fget_object(bucket, key, str(archive))
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")  # refuses absolute paths, "..", links out, devices


#: The result's keys that name one output file each; the server bundles and registers them.
OUTPUT_KEYS = ("best_pt", "onnx", "int8_onnx")


def named_outputs(result: dict) -> list[str]:
    """Every output path the result names: weights, ONNX, the INT8 ONNX, engines."""
    named = [result.get(key) for key in OUTPUT_KEYS]
    named += [e.get("path") for e in result.get("engines") or [] if isinstance(e, dict)]
    return [str(name) for name in named if name]


def output_files(result: dict, out_dir: Path) -> list[Path]:
    """``result.json`` and every file under ``out_dir`` that the result names (weights, ONNX, INT8 ONNX,
    engines)."""
    out_dir = Path(out_dir).resolve()
    named = named_outputs(result)
    files = [out_dir / "result.json"]
    for name in named:
        if name and Path(name).resolve().is_relative_to(out_dir) and Path(name).is_file():
            files.append(Path(name).resolve())
    return files


def upload_outputs(spec: dict, result: dict, client=None) -> list[str]:
    if not spec.get("outputs_uri"):
        return []
    bucket, prefix = _split(spec["outputs_uri"])
    out_dir = Path(spec["out_dir"]).resolve()
    client = client or _client()
    keys = []
    # result.json last: the executor treats its presence as "outputs complete".
    for path in sorted(output_files(result, out_dir), key=lambda p: p.name == "result.json"):
        key = prefix.rstrip("/") + "/" + path.relative_to(out_dir).as_posix()
        client.fput_object(bucket, key, str(path))
        keys.append(key)
    return keys
