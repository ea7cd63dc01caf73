"""The data contract on synthetic batches: each rule rejects with its reason, the rest are kept."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from training.data_contract import (
    Candidate,
    ContractLimits,
    ContractViolation,
    DataContract,
    ReferenceIndex,
    parse_yolo_labels,
)
from training.synth import render_frame

NAMES = ("scratch", "dent", "stain")
BOX = [{"cls": 0, "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2}]


def _jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _scene(i: int) -> np.ndarray:
    image, _ = render_frame("base", seed=11, index=i, imgsz=160)
    return image


def _cands(n: int, start: int = 0) -> list[Candidate]:
    return [Candidate(f"s{i}", _jpeg(_scene(i)), list(BOX), "cam-1") for i in range(start, start + n)]


def test_a_clean_batch_passes_with_a_balance_report() -> None:
    report = DataContract(ContractLimits(NAMES)).check_batch(_cands(6))
    assert report.accepted == [f"s{i}" for i in range(6)]
    assert report.rejected == {}
    assert not report.halted
    assert report.class_counts == {"scratch": 6, "dent": 0, "stain": 0}
    assert any("'dent' has 0 of 6 boxes" in w for w in report.class_warnings)


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda c: setattr(c, "data", b"\xff\xd8\xff" + b"garbage" * 10), "does not decode"),
    (lambda c: setattr(c, "data", b"GIF89a" + b"x" * 100), "format unknown"),
    (lambda c: setattr(c, "labels", [{"cls": 7, "cx": .5, "cy": .5, "w": .1, "h": .1}]), "outside the class list"),
    (lambda c: setattr(c, "labels", [{"cls": 0, "cx": .95, "cy": .5, "w": .3, "h": .1}]), "outside the image"),
    (lambda c: setattr(c, "labels", [{"cls": 0, "cx": .5, "cy": .5, "w": 0.0, "h": .1}]), "no area"),
    (lambda c: setattr(c, "labels", [{"cls": "x", "cx": .5, "cy": .5, "w": .1, "h": .1}]), "not an integer"),
    (lambda c: setattr(c, "labels", None), "no labels"),
    (lambda c: setattr(c, "data", _jpeg(np.zeros((8, 8, 3), np.uint8))), "sides must lie"),
])
def test_each_rule_rejects_with_its_reason(mutate, reason) -> None:
    cands = _cands(10)
    mutate(cands[3])
    report = DataContract(ContractLimits(NAMES)).check_batch(cands)
    assert list(report.rejected) == ["s3"]
    assert reason in report.rejected["s3"]
    assert len(report.accepted) == 9


def test_exact_and_near_duplicates_are_rejected_naming_the_original() -> None:
    cands = _cands(5)
    exact = Candidate("copy", cands[1].data, list(BOX))
    noisy = _scene(2).astype(np.int16) + np.random.default_rng(0).integers(-3, 4, (160, 160, 3))
    near = Candidate("near", _jpeg(np.clip(noisy, 0, 255).astype(np.uint8)), list(BOX))
    report = DataContract(ContractLimits(NAMES)).check_batch([*cands, exact, near])
    assert report.rejected["copy"] == "exact duplicate of sample s1"
    assert report.rejected["near"].startswith("near duplicate of sample s2")
    assert "near" not in report.accepted


def test_golden_set_images_and_their_near_copies_are_leakage(tmp_path: Path) -> None:
    golden = tmp_path / "golden"
    golden.mkdir()
    for i in (100, 101):
        cv2.imwrite(str(golden / f"g{i}.png"), _scene(i))
    index = ReferenceIndex.from_images(sorted(golden.iterdir()))
    leaked_exact = Candidate("exact", (golden / "g100.png").read_bytes(), list(BOX))
    leaked_near = Candidate("near", _jpeg(_scene(101)), list(BOX))
    report = DataContract(ContractLimits(NAMES), golden=index).check_batch([*_cands(8), leaked_exact, leaked_near])
    assert report.rejected["exact"] == "image is in the golden set (leakage)"
    assert report.rejected["near"].startswith("near duplicate of a golden-set image (leakage")
    assert len(report.accepted) == 8


def test_images_already_in_an_earlier_snapshot_are_exact_duplicates() -> None:
    import hashlib

    cands = _cands(4)
    contract = DataContract(ContractLimits(NAMES), known_sha256=[hashlib.sha256(cands[0].data).hexdigest()])
    assert "earlier snapshot" in contract.check_batch(cands).rejected["s0"]


def test_too_many_rejects_halt_the_batch_with_a_report() -> None:
    cands = _cands(10)
    for c in cands[:3]:
        c.labels = [{"cls": 9, "cx": .5, "cy": .5, "w": .1, "h": .1}]
    report = DataContract(ContractLimits(NAMES, max_reject_fraction=0.2)).check_batch(cands)
    assert report.halted
    assert report.halt_reason.startswith("3 of 10 samples (30%) break the data contract")
    assert report.as_dict()["reject_fraction"] == 0.3
    assert not DataContract(ContractLimits(NAMES, max_reject_fraction=0.3)).check_batch(cands).halted


def test_yolo_label_text_parses_and_malformed_lines_are_violations() -> None:
    assert parse_yolo_labels("0 0.5 0.5 0.2 0.1\n\n2 0.1 0.1 0.05 0.05\n") == [
        {"cls": 0, "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.1}, {"cls": 2, "cx": 0.1, "cy": 0.1, "w": 0.05, "h": 0.05}]
    with pytest.raises(ContractViolation, match="line 2: expected 'class cx cy w h'"):
        parse_yolo_labels("0 0.5 0.5 0.2 0.1\n0 0.5 0.5\n")
    with pytest.raises(ContractViolation, match="integer class"):
        parse_yolo_labels("a 0.5 0.5 0.2 0.1")
