"""``edgeloop data synth`` through Typer's test runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from training.cli import data_app

runner = CliRunner()


def test_list_scenarios() -> None:
    result = runner.invoke(data_app, ["synth", "--list-scenarios"])
    assert result.exit_code == 0, result.output
    for name in ("base", "low_light", "new_variant", "new_defect_look", "line_b"):
        assert name in result.output


def test_synth_dataset(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    result = runner.invoke(
        data_app,
        [
            "synth",
            "--out",
            str(out),
            "--scenario",
            "base",
            "--seed",
            "0",
            "--train",
            "5",
            "--val",
            "2",
            "--imgsz",
            "96",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "data.yaml").is_file()
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 5
    assert len(list((out / "labels" / "val").glob("*.txt"))) == 2


def test_synth_frames(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    result = runner.invoke(
        data_app,
        ["synth", "--out", str(out), "--scenario", "line_b", "--frames", "4", "--start", "20", "--seed", "3"],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        f"frame_{i:06d}.{ext}" for i in range(20, 24) for ext in ("jpg", "txt")
    ]


def test_unknown_scenario_and_missing_out(tmp_path: Path) -> None:
    result = runner.invoke(data_app, ["synth", "--out", str(tmp_path), "--scenario", "mars"])
    assert result.exit_code != 0
    assert "unknown scenario" in result.output
    result = runner.invoke(data_app, ["synth"])
    assert result.exit_code != 0


def test_cli_module_imports_stay_light() -> None:
    """Importing the CLI (as the root CLI does) pulls in neither numpy/OpenCV nor torch."""
    code = (
        "import sys, training, training.cli;"
        "bad = [m for m in ('numpy', 'cv2', 'torch', 'ultralytics', 'server', 'edge_agent') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
