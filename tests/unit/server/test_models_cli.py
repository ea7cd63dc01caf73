"""`edgeloop models rollback [--to N]`, `models history` and `models approve`: the calls they make
and what they print, with the API call replaced by a recorder."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from server import cli

ROLLED = {"from_version": 3, "to_version": 1, "registry_moved": True, "rollout_rolled_back": 7,
          "commanded": ["cam-3", "cam-4"], "reverted_by_rollout": ["cam-1"], "left": ["cam-9"],
          "offline": ["cam-4"]}
HISTORY = {"total": 1, "limit": 50, "offset": 0, "items": [{"at": "2026-12-07T12:00:00+00:00", "alias": "production", "version": 1, "from_version": 3,
            "actor": "olga", "reason": "line 3 misses dents"}]}


@pytest.fixture
def calls(monkeypatch):
    recorded: list[tuple[str, str, dict]] = []
    answers = {"/api/v1/models/rollback": ROLLED, "/api/v1/aliases/history": HISTORY,
               "/api/v1/models/4/approve": {"version": 4, "status": "approved"}}

    def fake_call(api_url, token, method, path, **kwargs):
        recorded.append((method, path, kwargs))
        return answers[path]

    monkeypatch.setattr(cli, "_call", fake_call)
    return recorded


def _run(*args):
    result = CliRunner().invoke(cli.app, [*args, "--token", "t"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_rollback_to_a_version_says_what_happened_to_the_fleet(calls):
    out = _run("models", "rollback", "--to", "1", "--reason", "line 3 misses dents")
    assert calls == [("POST", "/api/v1/models/rollback", {"json": {"reason": "line 3 misses dents", "version": 1}})]
    assert "version 1 is production again (version 3 marked rolled_back)" in out
    assert "rollout 7 rolled back: 1 device(s) revert with it" in out
    assert "2 device(s) sent a signed rollback command, 1 of them offline" in out
    assert "cam-9" in out


def test_rollback_without_a_version_lets_the_server_pick_the_one_before(calls):
    _run("models", "rollback")
    assert calls == [("POST", "/api/v1/models/rollback", {"json": {"reason": ""}})]


def test_history_and_an_approval_that_waits_for_its_rollout(calls):
    assert "line 3 misses dents" in _run("models", "history")
    assert "becomes production when its rollout completes" in _run("models", "approve", "4")
