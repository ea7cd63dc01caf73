"""``edgeloop stack``: start, inspect and stop the embedded broker and object store.

Module-level imports are typer, rich and the standard library only; the services are
imported when a command runs.
"""

from __future__ import annotations

import json
import shlex
import signal
import threading
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Embedded Mosquitto broker + SeaweedFS S3 for one machine (demo, development).",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

DEFAULT_DIR = Path(".edgeloop/stack")
DIR_OPTION = typer.Option(
    DEFAULT_DIR, "--dir", help="Folder holding the stack's config, data, logs and stack.json."
)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _stack(directory: Path):
    from server.stack.stack import EmbeddedStack

    return EmbeddedStack(directory)


def _service_error():
    from server.stack.errors import ServiceError

    return ServiceError


def _status_table(status: dict[str, Any]) -> Table:
    table = Table(title=f"edgeloop stack in {status['workdir']}", title_justify="left")
    table.add_column("service")
    table.add_column("state")
    table.add_column("pid", justify="right")
    table.add_column("endpoint")
    table.add_column("files")
    for name, svc in status.get("services", {}).items():
        if svc["running"] and svc["answers"]:
            state = "[green]running[/]"
        elif svc["running"]:
            state = "[yellow]running, not answering[/]"
        else:
            state = "[red]stopped[/]"
        files = svc.get("log_file") or svc.get("log_dir") or ""
        table.add_row(name, state, str(svc.get("pid") or "-"), str(svc.get("endpoint") or "-"), files)
    return table


@app.command()
def up(
    directory: Path = DIR_OPTION,
    foreground: bool = typer.Option(
        False, "--foreground", help="Stay attached; stop both services on Ctrl+C / SIGTERM."
    ),
) -> None:
    """Start Mosquitto and SeaweedFS S3 (detached unless --foreground) and save stack.json."""
    service_error = _service_error()
    stack = _stack(directory)
    try:
        with console.status("starting Mosquitto and SeaweedFS..."):
            stack.up(detach=not foreground)
    except service_error as exc:
        _fail(str(exc))
    console.print(_status_table(stack.status()))
    console.print(
        f'Point the server at it: [bold]eval "$(edgeloop stack env --dir {shlex.quote(str(directory))})"[/]',
        highlight=False,
    )
    if not foreground:
        console.print(
            f"Stop it with: [bold]edgeloop stack down --dir {shlex.quote(str(directory))}[/]", highlight=False
        )
        return
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print("Running in the foreground; Ctrl+C stops it.")
    try:
        while not stop.wait(1.0):
            status = stack.status()
            if not status["running"]:
                err_console.print("[red]a service exited[/]; stopping the stack")
                break
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        with console.status("stopping..."):
            stack.down()
        console.print("stopped")


@app.command()
def down(directory: Path = DIR_OPTION) -> None:
    """Stop the services recorded in stack.json (credentials and data are kept)."""
    service_error = _service_error()
    stack = _stack(directory)
    if stack.load_state() is None:
        console.print(f"no stack in {directory}")
        return
    try:
        with console.status("stopping (SeaweedFS takes a few seconds)..."):
            stopped = stack.down()
    except service_error as exc:
        _fail(str(exc))
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(
    directory: Path = DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show whether the services run and answer. Exit code 0 when both run, 3 otherwise."""
    info = _stack(directory).status()
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
    elif not info["exists"]:
        console.print(f"no stack in {directory}", highlight=False)
        console.print(
            f"start one with: [bold]edgeloop stack up --dir {shlex.quote(str(directory))}[/]", highlight=False
        )
    else:
        console.print(_status_table(info))
    if not info["running"]:
        raise typer.Exit(3)


@app.command()
def env(directory: Path = DIR_OPTION) -> None:
    """Print `export ...` lines pointing the server at the stack (use with eval)."""
    service_error = _service_error()
    stack = _stack(directory)
    try:
        variables = stack.settings_env()
    except service_error as exc:
        _fail(str(exc))
    if not stack.status()["running"]:
        err_console.print(f"[yellow]warning:[/] the stack in {directory} is not running")
    for key, value in variables.items():
        typer.echo(f"export {key}={shlex.quote(value)}")
