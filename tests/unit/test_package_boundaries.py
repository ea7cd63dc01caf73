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


# The one narrow exception: drift statistics must be computed by the same code on the device
# (live windows) and on the training side (a model version's reference), and the server reads
# their metric names and bin edges. They live in edge_agent.drift_stats (numpy + OpenCV only,
# no other edge_agent import), which training and server may import; nothing else of the agent.
ALLOWED = {
    "training": {"edge_agent.drift_stats"},
    "server": {"edge_agent.drift_stats"},
}
SHARED_LEAF = "edge_agent/drift_stats.py"


def _modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _imports(path: Path, allowed: set[str] = frozenset()) -> set[str]:
    return {name.split(".")[0] for name in _modules(path) if name not in allowed}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_design_allows(package):
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _imports(path, ALLOWED.get(package, set())) & FORBIDDEN[package]
    ]
    assert not violations, "\n".join(violations)


def test_fleet_simulator_speaks_only_the_wire():
    # edgeloop/simulator is a product of its own: it knows the server and the agent only through
    # protocol/ (and firmware_bundles/ for signed commands), never their internals.
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "edgeloop" / "simulator").rglob("*.py"))
        for name in _imports(path) & {"server", "edge_agent", "training", "torch", "ultralytics", "fastapi"}
    ]
    assert not violations, "\n".join(violations)


def test_shared_drift_stats_stays_a_leaf():
    # What training and server may import from the agent must not pull the rest of it in.
    ours = {"protocol", "firmware_bundles", "edge_agent", "training", "server", "edgeloop"}
    leaked = _imports(ROOT / SHARED_LEAF) & ours
    assert not leaked, f"{SHARED_LEAF} imports {sorted(leaked)}"


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
