"""``edgeloop agent``: run the device daemon; ``edgeloop agent enroll``: get this device's identity.
Light imports at module level (edge installs)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import typer

app = typer.Typer()
# `edgeloop agent` with no sub-command runs the daemon (its options are the group's options),
# so existing invocations keep working; `python -m edge_agent` runs this group directly.
agent_app = typer.Typer(help="Run the edge agent, or enroll this device first.")
app.add_typer(agent_app, name="agent")

DEFAULT_CREDENTIALS = Path(".edgeloop/agent/credentials.json")


@agent_app.callback(invoke_without_command=True)
def agent(
    ctx: typer.Context,
    device_id: str = typer.Option(None, help="Device id (env EDGELOOP_AGENT_DEVICE_ID)."),
    credentials: Path = typer.Option(None, "--credentials",
                                     help="Credentials JSON from `edgeloop agent enroll` or `edgeloop devices add`."),
    source: str = typer.Option(None, help="folder:/path, a video file, a stream URL or a camera index."),
    data_dir: Path = typer.Option(None, help="Where models, spool and update state live."),
    trusted_keys: Path = typer.Option(None, help="Public key file or folder that bundles must verify with."),
    max_fps: float = typer.Option(None, help="Cap the frame rate (0 = unlimited)."),
) -> None:
    """Run the edge agent: inference, sample collection, shadow and OTA updates."""
    if ctx.invoked_subcommand is not None:
        return
    from edge_agent.logging import configure_logging
    from edge_agent.runtime import Agent
    from edge_agent.settings import AgentSettings

    overrides = {k: v for k, v in {
        "device_id": device_id, "credentials_file": credentials, "source": source, "data_dir": data_dir,
        "trusted_keys": trusted_keys, "max_fps": max_fps}.items() if v is not None}
    configure_logging()
    settings = AgentSettings(**overrides)
    runner = Agent(settings)
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    signal.signal(signal.SIGINT, lambda *_: runner.stop())
    runner.run()


def _detect_hardware():
    try:
        from edge_agent.hardware import detect_hardware
    except ImportError:  # older layout: the probe lived in the runtime module
        from edge_agent.runtime import detect_hardware
    return detect_hardware()


@agent_app.command("enroll")
def enroll_command(
    device_id: str = typer.Option(..., envvar="EDGELOOP_AGENT_DEVICE_ID",
                                  help="This device's id: 1-63 of a-z 0-9 - _ (env EDGELOOP_AGENT_DEVICE_ID)."),
    api_url: str = typer.Option("http://127.0.0.1:8000", envvar="EDGELOOP_AGENT_API_URL",
                                help="Server URL (env EDGELOOP_AGENT_API_URL)."),
    bootstrap_token: str = typer.Option(None, envvar="EDGELOOP_BOOTSTRAP_TOKEN", show_default=False,
                                        help="The bootstrap token (env EDGELOOP_BOOTSTRAP_TOKEN; prefer "
                                             "--bootstrap-token-file: arguments are visible to other users)."),
    bootstrap_token_file: Path = typer.Option(None, exists=True, dir_okay=False,
                                              help="File holding the bootstrap token."),
    out: Path = typer.Option(None, "--out", envvar="EDGELOOP_AGENT_CREDENTIALS_FILE",
                             help=f"Credentials file to write (0600; default {DEFAULT_CREDENTIALS}; "
                                  "env EDGELOOP_AGENT_CREDENTIALS_FILE)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing credentials file."),
    ca_file: Path = typer.Option(None, "--ca-file", exists=True, dir_okay=False,
                                 help="CA bundle the server's HTTPS certificate must chain to."),
    timeout: float = typer.Option(30.0, help="Seconds to wait for the server."),
) -> None:
    """Exchange a bootstrap token for this device's API token and broker credentials, once."""
    import httpx

    from edge_agent import AGENT_VERSION
    from edge_agent.enroll import EnrollError, enroll, write_credentials

    token = bootstrap_token_file.read_text().strip() if bootstrap_token_file else bootstrap_token
    if not token:
        typer.echo("error: no bootstrap token: pass --bootstrap-token-file or set EDGELOOP_BOOTSTRAP_TOKEN",
                   err=True)
        raise typer.Exit(2)
    path = out or DEFAULT_CREDENTIALS
    if path.exists() and not force:
        typer.echo(f"error: {path} already exists; this device seems enrolled (use --force to replace it)",
                   err=True)
        raise typer.Exit(2)
    verify: str | bool = str(ca_file) if ca_file else True
    try:
        with httpx.Client(base_url=api_url, timeout=timeout, verify=verify) as client:
            creds = enroll(client, bootstrap_token=token, device_id=device_id, hardware=_detect_hardware(),
                           agent_version=AGENT_VERSION)
    except EnrollError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    write_credentials(path, creds)
    groups = ", ".join(creds.groups) or "none"
    tags = ", ".join(creds.tags) or "none"
    sys.stdout.write(f"enrolled {creds.device_id} (groups: {groups}; tags: {tags}); credentials in {path}\n")
