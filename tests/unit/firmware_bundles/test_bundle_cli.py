"""The ``edgeloop keys`` / ``edgeloop bundle`` command-line contract."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from firmware_bundles.cli import bundle_app, keys_app

runner = CliRunner()


def _last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


def _keys(tmp_path: Path, name: str = "signing-key") -> tuple[Path, Path, str]:
    result = runner.invoke(keys_app, ["generate", "--out", str(tmp_path / "keys"), "--name", name])
    assert result.exit_code == 0, result.output
    kid = re.search(r"key id: ([0-9a-f]{16})", result.output).group(1)
    return tmp_path / "keys" / f"{name}.pem", tmp_path / "keys" / f"{name}.pub.pem", kid


def _build(tmp_path: Path, private: Path, *extra: str) -> Path:
    model = tmp_path / "best.onnx"
    model.write_bytes(b"not really onnx" * 50)
    out = tmp_path / "bundle.tar"
    args = ["build", "--model", str(model), "--version", "3", "--key", str(private), "--out", str(out)]
    result = runner.invoke(bundle_app, [*args, *extra])
    assert result.exit_code == 0, result.output
    return out


def _tamper(bundle: Path) -> None:
    with tarfile.open(bundle) as tar:
        members = [(i, tar.extractfile(i).read()) for i in tar.getmembers()]
    with tarfile.open(bundle, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.name.startswith("files/"):
                data = data.upper()
            tar.addfile(info, io.BytesIO(data))


def test_keys_generate_writes_a_pair_and_prints_the_id(tmp_path) -> None:
    private, public, kid = _keys(tmp_path)
    assert private.is_file() and public.is_file() and "pub" in public.name
    assert (private.stat().st_mode & 0o777) == 0o600
    result = runner.invoke(keys_app, ["id", str(public)])
    assert result.exit_code == 0 and result.output.strip() == kid
    # A second generate into the same folder must not destroy the key.
    again = runner.invoke(keys_app, ["generate", "--out", str(tmp_path / "keys")])
    assert (
        again.exit_code != 0
        and _last_line(again).startswith("error:")
        and "already exists" in _last_line(again)
    )


def test_build_verify_ok(tmp_path) -> None:
    private, public, kid = _keys(tmp_path)
    bundle = _build(tmp_path, private, "--class-names", "scratch,dent", "--imgsz", "160", "--name", "line3")
    result = runner.invoke(bundle_app, ["verify", str(bundle), "--key", str(public)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "version 3" in result.output and kid in result.output
    # A folder of public keys works too.
    result = runner.invoke(bundle_app, ["verify", str(bundle), "--key", str(public.parent)])
    assert result.exit_code == 0, result.output


def test_tampered_bundle_fails_with_reason_on_last_line(tmp_path) -> None:
    private, public, _ = _keys(tmp_path)
    bundle = _build(tmp_path, private, "--class-names", "scratch,dent", "--imgsz", "160")
    _tamper(bundle)
    result = runner.invoke(bundle_app, ["verify", str(bundle), "--key", str(public)])
    assert result.exit_code != 0
    assert _last_line(result).startswith("error: sha256 of files/best.onnx")


def test_wrong_key_retired_key_and_digest_fail_with_reasons(tmp_path) -> None:
    private, public, kid = _keys(tmp_path)
    _, other_public, _ = _keys(tmp_path, name="other")
    bundle = _build(tmp_path, private, "--class-names", "a", "--imgsz", "64")
    result = runner.invoke(bundle_app, ["verify", str(bundle), "--key", str(other_public)])
    assert result.exit_code != 0 and _last_line(result) == (
        f"error: bundle is signed by key {kid}, which is not trusted (trusted: {_key_id(other_public)})"
    )
    result = runner.invoke(bundle_app, ["verify", str(bundle), "--key", str(public), "--retired", kid])
    assert result.exit_code != 0 and "retired" in _last_line(result)
    result = runner.invoke(bundle_app, ["verify", str(bundle), "--key", str(public), "--sha256", "0" * 64])
    assert result.exit_code != 0 and _last_line(result).startswith("error: bundle sha256 is")
    result = runner.invoke(bundle_app, ["verify", str(tmp_path / "missing.tar"), "--key", str(public)])
    assert result.exit_code != 0 and _last_line(result).startswith("error: bundle not found")


def _key_id(public: Path) -> str:
    return runner.invoke(keys_app, ["id", str(public)]).output.strip()


def test_sign_rotates_the_key(tmp_path) -> None:
    old_private, old_public, old_kid = _keys(tmp_path, name="old")
    new_private, new_public, new_kid = _keys(tmp_path, name="new")
    bundle = _build(tmp_path, old_private, "--class-names", "a", "--imgsz", "64")
    result = runner.invoke(
        bundle_app, ["sign", str(bundle), "--key", str(new_private), "--trust", str(old_public)]
    )
    assert result.exit_code == 0, result.output
    assert new_kid in result.output
    assert runner.invoke(bundle_app, ["verify", str(bundle), "--key", str(new_public)]).exit_code == 0
    result = runner.invoke(bundle_app, ["verify", str(bundle), "--key", str(old_public)])
    assert result.exit_code != 0 and new_kid in _last_line(result)


def test_build_with_labels_file_and_extra_file(tmp_path) -> None:
    private, public, _ = _keys(tmp_path)
    (tmp_path / "labels.txt").write_text("scratch\n\ndent\n")
    (tmp_path / "notes.md").write_text("trained on line 3")
    bundle = _build(
        tmp_path,
        private,
        "--labels",
        str(tmp_path / "labels.txt"),
        "--imgsz",
        "96",
        "--file",
        str(tmp_path / "notes.md"),
        "--min-agent-version",
        "0.2.0",
    )
    result = runner.invoke(bundle_app, ["inspect", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    manifest = summary["manifest"]
    assert manifest["class_names"] == ["scratch", "dent"] and manifest["input"]["imgsz"] == 96
    assert {f["path"]: f["role"] for f in manifest["files"]} == {
        "best.onnx": "model.onnx",
        "notes.md": "extra",
    }
    assert manifest["min_agent_version"] == "0.2.0" and manifest["model_name"] == "best"
    assert summary["integrity"] == "ok" and summary["signature_present"] is True


def test_inspect_table_and_tampered_inspect(tmp_path) -> None:
    private, _, kid = _keys(tmp_path)
    bundle = _build(tmp_path, private, "--class-names", "a,b", "--imgsz", "64")
    result = runner.invoke(bundle_app, ["inspect", str(bundle)])
    assert result.exit_code == 0, result.output
    assert kid in result.output and "best.onnx [model.onnx]" in result.output
    _tamper(bundle)
    result = runner.invoke(bundle_app, ["inspect", str(bundle)])
    assert result.exit_code != 0 and _last_line(result).startswith("error: sha256 of files/best.onnx")


def test_build_errors_are_one_line(tmp_path) -> None:
    private, _, _ = _keys(tmp_path)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    base = [
        "build",
        "--model",
        str(model),
        "--version",
        "1",
        "--key",
        str(private),
        "--out",
        str(tmp_path / "b.tar"),
    ]
    result = runner.invoke(bundle_app, [*base, "--class-names", "a", "--labels", str(model), "--imgsz", "64"])
    assert result.exit_code != 0 and "not both" in _last_line(result)
    result = runner.invoke(bundle_app, [*base, "--class-names", "a", "--imgsz", "64", "--name", "bad name!"])
    assert result.exit_code != 0 and "model_name" in _last_line(result)
    # Without flags the ONNX metadata is needed; a file that is not ONNX gives a clear error.
    result = runner.invoke(bundle_app, base)
    assert result.exit_code != 0 and _last_line(result).startswith("error:")
    assert not (tmp_path / "b.tar").exists()


def test_build_reads_ultralytics_metadata_from_onnx(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["output0"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 160, 160])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 160, 160])],
    )
    model = helper.make_model(graph)
    helper.set_model_props(model, {"names": "{0: 'scratch', 1: 'dent'}", "imgsz": "[160, 160]"})
    path = tmp_path / "yolo.onnx"
    onnx.save(model, str(path))
    private, public, _ = _keys(tmp_path)
    out = tmp_path / "b.tar"
    args = ["build", "--model", str(path), "--version", "1", "--key", str(private), "--out", str(out)]
    result = runner.invoke(bundle_app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(runner.invoke(bundle_app, ["inspect", str(out), "--json"]).output)["manifest"]
    assert manifest["class_names"] == ["scratch", "dent"] and manifest["input"]["imgsz"] == 160
    # Flags win over metadata.
    result = runner.invoke(bundle_app, [*args, "--class-names", "x", "--imgsz", "320"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(runner.invoke(bundle_app, ["inspect", str(out), "--json"]).output)["manifest"]
    assert manifest["class_names"] == ["x"] and manifest["input"]["imgsz"] == 320
