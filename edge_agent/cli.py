"""``edgeloop agent``: run the device daemon. Light imports at module level (edge installs)."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

app = typer.Typer()


@app.command("agent")
def agent(
    device_id: str = typer.Option(None, help="Device id (env EDGELOOP_AGENT_DEVICE_ID)."),
    credentials: Path = typer.Option(None, "--credentials", help="Credentials JSON from `edgeloop devices add`."),
    source: str = typer.Option(None, help="folder:/path, a video file, a stream URL or a camera index."),
    data_dir: Path = typer.Option(None, help="Where models, spool and update state live."),
    trusted_keys: Path = typer.Option(None, help="Public key file or folder that bundles must verify with."),
    max_fps: float = typer.Option(None, help="Cap the frame rate (0 = unlimited)."),
) -> None:
    """Run the edge agent: inference, sample collection, shadow and OTA updates."""
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
