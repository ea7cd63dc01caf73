"""Parsing the Ultralytics metadata strings (no onnx package needed)."""

from __future__ import annotations

import pytest

from firmware_bundles.onnx_meta import OnnxMetadataError, parse_imgsz, parse_names


def test_parse_names_dict_and_list() -> None:
    assert parse_names("{0: 'scratch', 1: 'dent'}") == ["scratch", "dent"]
    assert parse_names("{1: 'dent', 0: 'scratch'}") == ["scratch", "dent"]
    assert parse_names("['a', 'b']") == ["a", "b"]


@pytest.mark.parametrize("text", ["{}", "{0: 'a', 2: 'c'}", "__import__('os')", "not python", "42"])
def test_parse_names_refuses_bad_values(text: str) -> None:
    with pytest.raises(OnnxMetadataError):
        parse_names(text)


def test_parse_imgsz() -> None:
    assert parse_imgsz("[160, 160]") == 160
    assert parse_imgsz("640") == 640
    with pytest.raises(OnnxMetadataError, match="not square"):
        parse_imgsz("[160, 320]")
    with pytest.raises(OnnxMetadataError):
        parse_imgsz("[160]")
