"""A training pod's object-store I/O against real SeaweedFS: staged inputs in, named outputs out."""

from __future__ import annotations

import io
import json
import tarfile
import uuid

import pytest

from training.job_io import fetch_inputs, output_files, upload_outputs

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_env(seaweedfs, s3_store, monkeypatch):
    monkeypatch.setenv("EDGELOOP_S3_ENDPOINT", seaweedfs.endpoint)
    monkeypatch.setenv("EDGELOOP_S3_ACCESS_KEY", seaweedfs.access_key)
    monkeypatch.setenv("EDGELOOP_S3_SECRET_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("EDGELOOP_S3_SECURE", "false")
    return s3_store


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_inputs_are_fetched_and_outputs_uploaded_result_json_last(s3_env, tmp_path):
    prefix = f"jobs/{uuid.uuid4().hex}/"
    s3_env.put_bytes(prefix + "inputs.tar", _tar({"weights/production.pt": b"w", "data/train.txt": b"a.jpg\n"}))
    spec = {"inputs_uri": f"s3://{s3_env.bucket}/{prefix}inputs.tar", "inputs_dir": str(tmp_path / "in"),
            "outputs_uri": f"s3://{s3_env.bucket}/{prefix}out/", "out_dir": str(tmp_path / "out")}
    fetch_inputs(spec)
    assert (tmp_path / "in" / "weights" / "production.pt").read_bytes() == b"w"

    out = tmp_path / "out"
    (out / "train" / "weights").mkdir(parents=True)
    (out / "train" / "weights" / "best.pt").write_bytes(b"best")
    (out / "model.onnx").write_bytes(b"onnx")
    (out / "model.int8.onnx").write_bytes(b"int8")
    (out / "scratch.log").write_bytes(b"not named by the result")
    result = {"best_pt": str(out / "train" / "weights" / "best.pt"), "onnx": str(out / "model.onnx"),
              "int8_onnx": str(out / "model.int8.onnx"), "engines": [{"status": "skipped", "path": None}]}
    (out / "result.json").write_text(json.dumps(result))
    keys = upload_outputs(spec, result)
    assert keys[-1] == prefix + "out/result.json"
    assert set(keys) == {prefix + "out/result.json", prefix + "out/train/weights/best.pt", prefix + "out/model.onnx",
                         prefix + "out/model.int8.onnx"}
    assert s3_env.get_bytes(prefix + "out/train/weights/best.pt", max_bytes=100) == b"best"
    # The INT8 model rides in the bundle of a passing candidate: the server must get it back.
    assert s3_env.get_bytes(prefix + "out/model.int8.onnx", max_bytes=100) == b"int8"
    assert not s3_env.exists(prefix + "out/scratch.log")


def test_a_staged_tar_that_climbs_out_is_refused(s3_env, tmp_path):
    key = f"jobs/{uuid.uuid4().hex}/inputs.tar"
    s3_env.put_bytes(key, _tar({"../escape.txt": b"x"}))
    with pytest.raises(tarfile.OutsideDestinationError):
        fetch_inputs({"inputs_uri": f"s3://{s3_env.bucket}/{key}", "inputs_dir": str(tmp_path / "in")})
    assert not (tmp_path / "escape.txt").exists()


def test_local_specs_do_nothing_and_outputs_outside_out_dir_are_not_uploaded(tmp_path):
    fetch_inputs({"out_dir": str(tmp_path)})
    assert upload_outputs({"out_dir": str(tmp_path)}, {}) == []
    (tmp_path / "elsewhere.pt").write_bytes(b"x")
    assert output_files({"best_pt": str(tmp_path / "elsewhere.pt")}, tmp_path / "out") == [
        (tmp_path / "out" / "result.json").resolve()]
