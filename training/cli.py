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


@data_app.command("import")
def import_cmd(
    path: Path = typer.Argument(..., exists=True, file_okay=False, help="YOLO export (CVAT, Label Studio, "
                                "Roboflow, Ultralytics) or a folder of images with .txt labels."),
    source: str = typer.Option(..., "--source", help="Name recorded as the samples' source, e.g. cvat-line3."),
    names: str = typer.Option("", "--names", help="Comma-separated class names for a plain folder."),
    classes: str = typer.Option("", "--classes", help="Registered class names (default: ask the server)."),
    batch: int = typer.Option(64, "--batch", min=1, max=256, help="Images per request."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only read and check the dataset locally."),
    api_url: str = typer.Option(None, "--api-url", envvar="EDGELOOP_API_URL", help="Server URL."),
    token: str = typer.Option(None, "--token", envvar="EDGELOOP_TOKEN", help="Engineer API token.",
                              show_default=False),
) -> None:
    """Import labeled images through the server's ingest checks (engineer role)."""
    import json

    import httpx

    from training.yolo_import import ImportError_, iter_batches, plan_import

    api_url = api_url or "http://127.0.0.1:8000"
    client = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {token or ''}"}, timeout=120)
    registered = [c.strip() for c in classes.split(",") if c.strip()]
    if not registered and not dry_run:
        registered = _registered_classes(client)
    try:
        plan = plan_import(path, registered or [], [n.strip() for n in names.split(",") if n.strip()] or None)
    except ImportError_ as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"{plan.layout} layout, classes {plan.names}: {len(plan.usable)} usable, "
                  f"{len(plan.refused)} refused locally")
    for item in plan.refused[:20]:
        console.print(f"  [yellow]refused[/] {item.image.name}: {item.reason}")
    if dry_run or not plan.usable:
        raise typer.Exit(0 if plan.usable or dry_run else 1)
    totals: dict[str, int] = {}
    with _progress() as progress:
        task = progress.add_task("importing", total=len(plan.usable))
        for chunk in iter_batches(plan.usable, batch):
            files = [("files", (i.image.name, i.image.read_bytes())) for i in chunk]
            response = client.post("/api/v1/imports", files=files,
                                   data={"source": source, "labels": json.dumps([i.labels for i in chunk])})
            if response.status_code >= 400:
                console.print(f"[red]error:[/] {response.status_code}: {response.text[:300]}")
                raise typer.Exit(1)
            body = response.json()
            for key, value in body["counts"].items():
                totals[key] = totals.get(key, 0) + value
            for item in body["items"]:
                if item["status"] == "rejected":
                    progress.console.print(f"  [yellow]rejected[/] {item['file']}: {item['reason']}")
            progress.advance(task, len(chunk))
    console.print("imported: " + ", ".join(f"{v} {k}" for k, v in sorted(totals.items())))


def _registered_classes(client) -> list[str]:
    response = client.get("/api/v1/models", params={"limit": 1})
    if response.status_code >= 400:
        console.print(f"[red]error:[/] cannot read the registry ({response.status_code}); pass --classes")
        raise typer.Exit(1)
    items = response.json()["items"]
    if not items:
        console.print("[red]error:[/] no model registered yet; pass --classes")
        raise typer.Exit(1)
    return list(items[0]["class_names"])
