"""DESIGN.md's package boundaries, checked on the source: who may import whom, and that no
topic string is written outside protocol/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "protocol": {"firmware_bundles", "edge_agent", "training", "server", "edgeloop", "paho", "fastapi", "onnx",
                 "onnxruntime", "torch", "ultralytics"},
    "firmware_bundles": {"server", "training", "edge_agent", "edgeloop"},
    "edge_agent": {"server", "training", "edgeloop", "torch", "ultralytics"},
    "training": {"server", "edge_agent", "edgeloop"},
    "server": {"edge_agent", "edgeloop"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_design_allows(package):
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _imports(path) & FORBIDDEN[package]
    ]
    assert not violations, "\n".join(violations)


def test_no_topic_string_outside_protocol():
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("firmware_bundles", "edge_agent", "training", "server", "edgeloop")
        for path in (ROOT / package).rglob("*.py")
        if "edgeloop/v1" in path.read_text()
    ]
    assert not offenders, f"topic strings written outside protocol/: {offenders}"


def test_edge_install_does_not_load_torch_or_server():
    # The agent's whole runtime imports without the server/training stacks being loaded.
    code = (
        "import sys, edge_agent.runtime, edge_agent.cli; "
        "bad = [m for m in ('torch', 'ultralytics', 'fastapi', 'sqlalchemy', 'server', 'training') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
