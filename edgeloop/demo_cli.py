"""``edgeloop demo`` with a live progress view and a final report."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import typer

app = typer.Typer()


def bar(done: float, total: float, width: int = 30) -> str:
    filled = int(width * min(1.0, done / total)) if total else 0
    return "█" * filled + "░" * (width - filled)


def progress_line(kind: str, info: dict, bar: Callable[[float, float], str]) -> str | None:
    """One line for a progress event inside a stage (None for the stage events themselves)."""
    if kind == "seed_epoch":
        return f"training seed {bar(info['epoch'], info['epochs'])} epoch {info['epoch']}/{info['epochs']}"
    if kind == "samples":
        return f"samples {bar(info['pending'], info['threshold'])} {info['pending']}/{info['threshold']}  {info['by_status']}"
    if kind == "job":
        p = info.get("progress") or {}
        epoch = f" epoch {p['epoch']}/{p['epochs']} {bar(p['epoch'], p['epochs'])}" if p.get("epochs") else ""
        return f"job #{info['id']} {info['status']} · {info.get('stage') or ''}{epoch}"
    if kind == "devices":
        items = info["items"]
        done = sum(d["active_version"] == info["version"] for d in items)
        states = ", ".join(f"{d['id']}:{d['update_state'] or '-'}" for d in items)
        return f"switched {bar(done, len(items))} {done}/{len(items)}  {states}"
    return None


class PlainProgress:
    """Progress as plain lines for a log or a pipe: every stage start and end, and a changed
    progress line at most every ``every`` seconds (the same figures as the live table)."""

    def __init__(self, write: Callable[[str], None], every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write, self._every, self._clock = write, every, clock
        self._last, self._at = "", float("-inf")

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "stage":
            self._write(f"stage {info['stage']}: {info.get('detail', '')}")
            self._last, self._at = "", float("-inf")
        elif kind == "stage_done":
            self._write(f"stage {info['stage']} done in {info['seconds']:.1f} s")
        else:
            line = progress_line(kind, info, lambda done, total: "")
            now = self._clock()
            if line and line != self._last and now - self._at >= self._every:
                self._write("  " + " ".join(line.split()))
                self._last, self._at = line, now


@app.command("demo")
def demo(
    fast: bool = typer.Option(False, "--fast", help="Smaller threshold, image size and epochs: minutes on 2 cores."),
    devices: int = typer.Option(3, min=1, max=32, help="How many edge agents to run."),
    threshold: int = typer.Option(None, min=10, help="Samples that trigger the retrain (default 1000, --fast 250)."),
    workdir: Path = typer.Option(None, help="Where services, agents and logs live (default: a temp folder)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the report as JSON here."),
    timeout: float = typer.Option(3600.0, help="Give up on any one stage after this many seconds."),
    seed: int = typer.Option(None, min=0, help="Training seed of the seed model (default: the profile's); "
                                               "each seed is trained once and cached."),
) -> None:
    """Run the whole loop: stack, server, agents, collection, retrain, signed bundle, shadow, switch."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from edgeloop.demo import DemoConfig, DemoFailed, run_demo

    # SIGTERM unwinds like Ctrl-C, so the agents, server and services are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console(stderr=True)
    work = workdir
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="edgeloop-demo-"))
        work.chmod(0o711)  # Mosquitto drops root and must be able to reach its folder inside
    config = DemoConfig(workdir=work, fast=fast, devices=devices, threshold=threshold, timeout_seconds=timeout,
                        seed=seed)
    view = {"stages": {}, "current": "", "detail": "", "line": ""}

    def render() -> Table:
        table = Table(title=f"edgeloop demo{' --fast' if fast else ''} · {work}", expand=False)
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        for name, seconds in view["stages"].items():
            table.add_row(f"[green]✓[/] {name}", f"{seconds:.1f}")
        if view["current"]:
            table.add_row(f"[cyan]…[/] {view['current']}", "", end_section=True)
            table.add_row(f"[dim]{view['detail']}[/]", "")
            if view["line"]:
                table.add_row(view["line"], "")
        return table

    # A terminal gets a live table; a log file or pipe gets plain lines (Live would only print at the end).
    live = Live(render(), console=console, refresh_per_second=4, transient=False) if console.is_terminal else None
    plain = PlainProgress(console.print)

    def progress(kind: str, info: dict) -> None:
        if kind == "server":
            console.print(f"live dashboard: {info['url']}", soft_wrap=True)
            console.print(f"sign in with token {info['token']}", soft_wrap=True)
        if live is None:
            plain(kind, info)
            return
        if kind == "stage":
            view.update(current=info["stage"], detail=info.get("detail", ""), line="")
        elif kind == "stage_done":
            view["stages"][info["stage"]] = info["seconds"]
            view["current"] = ""
        else:
            view["line"] = progress_line(kind, info, bar) or view["line"]
        live.update(render())

    with live or contextlib.nullcontext():
        try:
            report = run_demo(config, progress)
        except DemoFailed as exc:
            console.print(f"[red]demo failed:[/] {exc}\nlogs: {work / 'logs'}")
            if json_path:
                json_path.write_text(json.dumps({"ok": False, "error": str(exc)}, indent=2))
            raise typer.Exit(1) from None

    _print_report(console, report)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2, default=str))
        console.print(f"report written to {json_path}")
    sys.stdout.flush()


def _print_report(console, report: dict) -> None:
    from rich.table import Table

    before, after = report["models"]["before"], report["models"]["after"]
    table = Table(title="models: seed → retrained")
    table.add_column("metric")
    table.add_column(f"v{before['version']} (before)", justify="right")
    table.add_column(f"v{after['version']} (after)", justify="right")
    for eval_set in ("golden", "shifted", "new_data"):
        for metric in ("map50", "map50_95"):
            if eval_set in before and eval_set in after:
                table.add_row(f"{eval_set} {metric}", f"{before[eval_set][metric]:.3f}",
                              f"{after[eval_set][metric]:.3f}")
    console.print(table)
    stages = Table(title="stages")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    for name, seconds in report["stages"].items():
        stages.add_row(name, f"{seconds:.1f}")
    stages.add_row("[b]total[/]", f"[b]{report['total_seconds']:.1f}[/]")
    console.print(stages)
    d = report["devices"]
    console.print(f"devices switched to v{after['version']}: {d['switched']}/{d['total']}")
    for wave in (report.get("rollout") or {}).get("waves", []):
        e = wave["evidence"]
        if e:
            console.print(f"wave {wave['name']} {wave['state']}: {e['test'] or 'undecided'} on {e['known']} known "
                          f"frames (candidate-only right {e['candidate_only']}, active-only right {e['active_only']})")
