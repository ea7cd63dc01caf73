"""``edgeloop data``: synthetic factory data on disk.

Only typer, rich and the standard library are imported here; the training modules (numpy,
OpenCV) are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

data_app = typer.Typer(
    name="data",
    help="Synthetic factory data: datasets, edge-agent frames, scenarios of domain shift.",
    no_args_is_help=True,
)

console = Console()


@data_app.callback()
def _data() -> None:
    """Synthetic factory data: datasets, edge-agent frames, scenarios of domain shift."""
    # A callback keeps ``data`` a command group even with a single command, so ``data synth``
    # is the same whether this app runs alone or mounted under the root CLI.


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@data_app.command("synth")
def synth_cmd(
    out: Path = typer.Option(None, "--out", "-o", help="Output folder."),
    scenario: str = typer.Option("base", "--scenario", "-s", help="Scenario (see --list-scenarios)."),
    seed: int = typer.Option(
        0, "--seed", min=0, help="Seed; frames are a pure function of (scenario, seed, index)."
    ),
    train: int = typer.Option(500, "--train", min=0, help="Training images (dataset mode)."),
    val: int = typer.Option(100, "--val", min=0, help="Validation images (dataset mode)."),
    imgsz: int = typer.Option(160, "--imgsz", min=32, help="Image size in pixels (square)."),
    frames: int = typer.Option(
        0,
        "--frames",
        min=0,
        help="Write N edge-agent frames (frame_NNNNNN.jpg + .txt labels) instead of a dataset.",
    ),
    start: int = typer.Option(0, "--start", min=0, help="First frame index."),
    list_scenarios: bool = typer.Option(False, "--list-scenarios", help="List the scenarios and exit."),
) -> None:
    """Write a YOLO dataset (images/, labels/, data.yaml) or a folder of agent frames."""
    from training import synth

    if list_scenarios:
        table = Table(title="scenarios")
        table.add_column("name", style="bold")
        table.add_column("default shift")
        table.add_column("description")
        for name, sc in synth.SCENARIOS.items():
            table.add_row(name, "yes" if name == synth.DEFAULT_SHIFT else "", sc.description)
        console.print(table)
        return
    if out is None:
        raise typer.BadParameter("--out is required", param_hint="--out")
    if scenario not in synth.SCENARIOS:
        raise typer.BadParameter(
            f"unknown scenario {scenario!r}; known: {', '.join(synth.SCENARIOS)}", param_hint="--scenario"
        )

    with _progress() as progress:
        if frames:
            task = progress.add_task(f"{scenario} frames", total=frames)
            paths = synth.write_frames(
                out, scenario, seed, start, frames, imgsz, progress=lambda n: progress.advance(task, n)
            )
            result = f"{len(paths)} frames in {out}"
        else:
            task = progress.add_task(f"{scenario} dataset", total=train + val)
            data_yaml = synth.write_yolo_dataset(
                out,
                scenario,
                seed,
                train,
                val,
                imgsz,
                start_index=start,
                progress=lambda n: progress.advance(task, n),
            )
            result = f"{train} train + {val} val images; {data_yaml}"
    console.print(f"[green]wrote[/green] {result}")
