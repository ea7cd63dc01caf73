"""`edgeloop jobs rejects` and `edgeloop jobs resolve-halt`: the calls they make and what they print,
with the API call replaced by a recorder."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from server import cli

REJECTS = {"job_id": 4, "halted": True, "halt_reason": "5 of 15 samples (33%) break the data contract",
           "resolved": None, "total": 2, "limit": 100, "offset": 0, "items": [
               {"sample_id": "aa11", "device_id": "cam-2", "reason": "label 0: class id 9 is outside the class list",
                "status": "validated"},
               {"sample_id": "bb22", "device_id": "cam-1", "reason": "image does not decode", "status": "validated"}]}
RESOLVED = {"job_id": 4, "dropped": 2, "status": "resolved", "next_job_id": 5, "next_job_status": "queued"}


@pytest.fixture
def calls(monkeypatch):
    recorded: list[tuple[str, str, dict]] = []

    def fake_call(api_url, token, method, path, **kwargs):
        recorded.append((method, path, kwargs))
        return RESOLVED if method == "POST" else REJECTS

    monkeypatch.setattr(cli, "_call", fake_call)
    return recorded


def test_rejects_lists_sample_device_reason_and_how_to_continue(calls):
    result = CliRunner().invoke(cli.app, ["jobs", "rejects", "4", "--token", "t"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert calls == [("GET", "/api/v1/jobs/4/rejects", {"params": {"limit": 100, "offset": 0}})]
    assert "job #4 halted: 5 of 15 samples (33%)" in result.output
    assert "edgeloop jobs resolve-halt 4 --reason" in result.output
    assert "aa11" in result.output and "cam-2" in result.output and "class id 9" in result.output
    assert "1-2 of 2 rejects" in result.output


def test_rejects_json_is_the_raw_answer(calls):
    result = CliRunner().invoke(cli.app, ["jobs", "rejects", "4", "--json", "--limit", "10", "--offset", "2"])
    assert result.exit_code == 0, result.output
    assert calls[0][2] == {"params": {"limit": 10, "offset": 2}}
    assert '"sample_id": "aa11"' in result.output


def test_resolve_halt_posts_the_reason(calls):
    result = CliRunner().invoke(cli.app, ["jobs", "resolve-halt", "4", "--reason", "cls 9 is a tool bug"])
    assert result.exit_code == 0, result.output
    assert calls == [("POST", "/api/v1/jobs/4/resolve-halt", {"json": {"reason": "cls 9 is a tool bug"}})]
    assert "job #4: halt resolved, 2 rejected samples dropped; job #5 queued continues" in result.output


def test_resolve_halt_needs_a_reason(calls):
    result = CliRunner().invoke(cli.app, ["jobs", "resolve-halt", "4"])
    assert result.exit_code == 2 and calls == []


def test_an_api_refusal_is_printed_with_its_reason(monkeypatch):
    class Response:
        status_code = 409
        content = b"{}"

        def json(self):
            return {"detail": "job 4 did not halt on the data contract"}

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def request(self, method, path, **kwargs):
            return Response()

    monkeypatch.setattr(cli, "_client", lambda api_url, token: Client())
    result = CliRunner().invoke(cli.app, ["jobs", "resolve-halt", "4", "-r", "because", "--token", "t"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "409: job 4 did not halt on the data contract" in result.output
