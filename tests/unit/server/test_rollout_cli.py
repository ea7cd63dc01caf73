"""`edgeloop rollout ...`: wave and gate parsing, the request body `create` sends, and what `show`
prints (gates against thresholds, devices), with the API call replaced by a recorder."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from server import cli

ROLLOUT = {
    "id": 7, "version": 3, "state": "paused", "mode": "shadow_then_switch", "on_failure": "pause",
    "require_approval": False, "created_by": "ops", "created_at": "2026-11-30T09:00:00Z", "settled": False,
    "reason": "wave canary failed its gates: min_agreement: 0.41 against 0.8 (worst: cam-1)",
    "waves": [
        {"index": 0, "name": "canary", "percent": None, "count": 1, "state": "failed", "phase": "shadow",
         "device_counts": {"aborted": 1}, "verdict": None, "reason": "min_agreement: 0.41 against 0.8",
         "gates": [{"name": "min_agreement", "value": 0.41, "threshold": 0.8, "passed": False, "detail": ""},
                   {"name": "paired_accuracy", "value": None, "threshold": 0.003, "passed": None, "detail": ""}],
         "devices": [{"device_id": "cam-1", "state": "aborted", "update_state": "REJECTED", "active_version": 2,
                      "reason": "aborted", "shadow": {"frames": 240, "confident_agreement": 0.41,
                                                      "corrected_frames": 12, "active_accuracy": 0.75,
                                                      "candidate_accuracy": 0.5, "candidate_latency_ms_p99": 14.2,
                                                      "errors": 0}}]},
        {"index": 1, "name": "fleet", "percent": 100.0, "count": None, "state": "pending", "phase": None,
         "device_counts": {}, "verdict": None, "reason": "", "gates": [], "devices": []},
    ],
}


@pytest.fixture
def calls(monkeypatch):
    recorded: list[tuple[str, str, dict]] = []

    def fake_call(api_url, token, method, path, **kwargs):
        recorded.append((method, path, kwargs))
        return ROLLOUT if method == "GET" or path.endswith(("/pause", "/rollouts")) else {**ROLLOUT, "state": "x"}

    monkeypatch.setattr(cli, "_call", fake_call)
    return recorded


def test_waves_and_gates_parse():
    assert cli.parse_wave("canary:1") == {"name": "canary", "count": 1}
    assert cli.parse_wave("10%") == {"name": "10%", "percent": 10.0}
    assert cli.parse_wave("half:50%") == {"name": "half", "percent": 50.0}
    assert cli.parse_gate("min_frames=500") == ("min_frames", 500)
    assert cli.parse_gate("min_agreement=0.95") == ("min_agreement", 0.95)
    assert cli.parse_gate("max_latency_p99_ms=none") == ("max_latency_p99_ms", None)
    for bad in ("canary:one", "x:%"):
        with pytest.raises(typer.BadParameter):
            cli.parse_wave(bad)
    with pytest.raises(typer.BadParameter):
        cli.parse_gate("min_frames")


def test_create_sends_selector_waves_gates(calls):
    result = CliRunner().invoke(cli.app, [
        "rollout", "create", "3", "--group", "line-b,line-c", "--tag", "night", "--wave", "canary:1", "--wave", "100%",
        "--gate", "min_frames=500", "--on-failure", "abort", "--require-approval", "--reason", "new lighting",
        "--token", "t"])
    assert result.exit_code == 0, result.output
    method, path, kwargs = calls[0]
    assert (method, path) == ("POST", "/api/v1/rollouts")
    assert kwargs["json"] == {
        "version": 3, "selector": {"groups": ["line-b", "line-c"], "tags": ["night"], "devices": []},
        "gates": {"min_frames": 500}, "require_approval": True, "reason": "new lighting",
        "waves": [{"name": "canary", "count": 1}, {"name": "100%", "percent": 100.0}], "on_failure": "abort"}
    assert "rollout 7 of version 3: canary → fleet" in result.output


def test_show_prints_gates_against_thresholds_and_devices(calls):
    result = CliRunner().invoke(cli.app, ["rollout", "show", "7", "--token", "t"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert calls == [("GET", "/api/v1/rollouts/7", {})]
    out = result.output
    assert "rollout 7: version 3 paused" in out and "wave canary failed its gates" in out
    assert "min_agreement" in out and "0.41" in out and "0.8" in out
    assert "cam-1" in out and "REJECTED" in out and "0.75 → 0.5" in out


def test_actions_post_with_a_reason(calls):
    result = CliRunner().invoke(cli.app, ["rollout", "pause", "7", "--reason", "shift change", "--token", "t"])
    assert result.exit_code == 0, result.output
    assert calls == [("POST", "/api/v1/rollouts/7/pause", {"json": {"reason": "shift change"}})]
    assert "rollout 7: paused" in result.output
