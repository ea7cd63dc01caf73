"""Server-side commands: ``edgeloop server``, and API clients for engineers and operators
(``retrain``, ``deploy``, ``devices``, ``models``, ``jobs``). Heavy imports stay inside commands."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer()
devices_app = typer.Typer(help="Enroll, list and revoke devices.", no_args_is_help=True)
models_app = typer.Typer(help="Inspect the model registry.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(models_app, name="models")
console = Console()

API_URL = typer.Option(os.environ.get("EDGELOOP_API_URL", "http://127.0.0.1:8000"), "--api-url",
                       help="Server URL (env EDGELOOP_API_URL).")
TOKEN = typer.Option(os.environ.get("EDGELOOP_TOKEN", ""), "--token",
                     help="API token (env EDGELOOP_TOKEN).", show_default=False)


def _client(api_url: str, token: str):
    import httpx

    if not token:
        console.print("[red]error:[/] no API token: pass --token or set EDGELOOP_TOKEN")
        raise typer.Exit(2)
    return httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _call(api_url: str, token: str, method: str, path: str, **kwargs) -> dict:
    import httpx

    try:
        with _client(api_url, token) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/] cannot reach {api_url}: {exc}")
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        console.print(f"[red]error:[/] {response.status_code}: {detail}")
        raise typer.Exit(1)
    return response.json() if response.content else {}


@app.command("server")
def serve(
    host: str = typer.Option(None, help="Bind address (env EDGELOOP_HOST)."),
    port: int = typer.Option(None, help="Port (env EDGELOOP_PORT)."),
) -> None:
    """Run the API, dashboard, MQTT ingest and retrain worker."""
    try:
        import uvicorn

        from server.app import create_app
        from server.logging import configure_logging
        from server.settings import ServerSettings
    except ModuleNotFoundError as exc:
        console.print(f"[red]error:[/] {exc.name} is missing: install the server extra, "
                      "`pip install 'edgeloop[server,training]'`")
        raise typer.Exit(2) from None
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = ServerSettings(**overrides)
    configure_logging()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)


@app.command("retrain")
def retrain(
    reason: str = typer.Option(..., "--reason", "-r", help="Why (kept in the job record and audit log)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job with a progress bar until it ends."),
    api_url: str = API_URL, token: str = TOKEN,
) -> None:
    """Ask the server for a retrain now (engineer role)."""
    job = _call(api_url, token, "POST", "/api/v1/retrain", json={"reason": reason})
    console.print(f"job #{job['id']} {job['status']} (trigger manual)")
    if wait:
        job = follow_job(api_url, token, job["id"])
        if job["status"] == "succeeded":
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in job.get("stages", {}).items())
            console.print(f"job #{job['id']} succeeded: version {job['candidate_version']} is production ({stages})")
            return
        result = job.get("result") or {}
        reason = result.get("error") or "; ".join(result.get("gate", {}).get("reasons", [])) or "see the job log"
        console.print(f"[red]job #{job['id']} {job['status']}:[/] {reason}")
        raise typer.Exit(1)


def follow_job(api_url: str, token: str, job_id: int) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"job #{job_id}", total=None, detail="queued")
        while True:
            job = _call(api_url, token, "GET", f"/api/v1/jobs/{job_id}")
            epochs = job.get("progress", {}).get("epochs")
            progress.update(task, total=epochs, completed=job.get("progress", {}).get("epoch", 0),
                            detail=f"{job['status']} {job.get('stage') or ''}")
            if job["status"] in {"succeeded", "rejected", "failed"}:
                return job
            time.sleep(1)


@app.command("deploy")
def deploy(
    version: str = typer.Argument("production", help="Registry version number, or 'production'."),
    device: list[str] = typer.Option(None, "--device", "-d", help="Target device (repeatable); default all."),
    direct: bool = typer.Option(False, "--direct", help="Switch without shadowing first."),
    shadow_frames: int = typer.Option(None, help="Frames to shadow before switching."),
    api_url: str = API_URL, token: str = TOKEN,
) -> None:
    """Send a deploy command for a model version over MQTT (operator role)."""
    body = {"version": version if version == "production" else int(version), "devices": device or None,
            "mode": "direct" if direct else "shadow_then_switch", "shadow_frames": shadow_frames}
    result = _call(api_url, token, "POST", "/api/v1/deployments", json=body)
    console.print(f"version {result['version']} sent to {len(result['devices'])} device(s): "
                  f"{', '.join(result['devices'])}")


def _csv(values: list[str] | None) -> list[str]:
    """``--tags a,b --tags c`` → [a, b, c]."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """``90s``, ``30m``, ``24h``, ``7d``, ``2w`` or a plain number of seconds → seconds."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration like 30m, 24h or 7d")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


@devices_app.command("bootstrap-token")
def devices_bootstrap_token(
    group: list[str] = typer.Option(None, "--group", "-g", help="Group enrolled devices join (repeatable, or a,b)."),
    tags: list[str] = typer.Option(None, "--tags", "-t", help="Tags enrolled devices get (a,b; repeatable)."),
    uses: int = typer.Option(1, "--uses", min=1, help="How many devices may enroll with it."),
    expires: str = typer.Option("24h", "--expires", help="Lifetime: 30m, 24h, 7d ..."),
    note: str = typer.Option("", "--note", help="What it is for (shown in listings)."),
    api_url: str = API_URL, token: str = TOKEN,
) -> None:
    """Create a bootstrap token for `edgeloop agent enroll`; the secret is printed once (admin role)."""
    body = {"groups": _csv(group), "tags": _csv(tags), "max_uses": uses,
            "expires_in_seconds": parse_duration(expires), "note": note}
    created = _call(api_url, token, "POST", "/api/v1/bootstrap-tokens", json=body)
    # The description on stderr, the secret alone on stdout: TOKEN=$(edgeloop devices bootstrap-token ...)
    typer.echo(f"bootstrap token {created['id']}: {created['max_uses']} use(s) until {created['expires_at']}, "
               f"groups {','.join(created['groups']) or '-'}, tags {','.join(created['tags']) or '-'}", err=True)
    sys.stdout.write(created["token"] + "\n")


@devices_app.command("bootstrap-tokens")
def devices_bootstrap_tokens(active: bool = typer.Option(None, "--active/--inactive", help="Filter by state."),
                             api_url: str = API_URL, token: str = TOKEN) -> None:
    """List bootstrap tokens, without their secrets (admin role)."""
    params = {} if active is None else {"active": str(active).lower()}
    data = _call(api_url, token, "GET", "/api/v1/bootstrap-tokens", params=params)
    table = Table("id", "state", "uses", "expires", "groups", "tags", "note", "created by")
    for t in data["items"]:
        table.add_row(str(t["id"]), t["state"], f"{t['uses']}/{t['max_uses']}", str(t["expires_at"]),
                      ",".join(t["groups"]), ",".join(t["tags"]), t["note"], t["created_by"])
    console.print(table)


@devices_app.command("revoke-bootstrap-token")
def devices_revoke_bootstrap_token(token_id: int, api_url: str = API_URL, token: str = TOKEN) -> None:
    """No device can enroll with this bootstrap token any more (admin role)."""
    _call(api_url, token, "DELETE", f"/api/v1/bootstrap-tokens/{token_id}")
    console.print(f"bootstrap token {token_id} revoked")


@devices_app.command("label")
def devices_label(
    device_id: str,
    group: list[str] = typer.Option(None, "--group", "-g", help="Replace the groups (repeatable, or a,b)."),
    tags: list[str] = typer.Option(None, "--tags", "-t", help="Replace the tags (a,b; repeatable)."),
    clear_groups: bool = typer.Option(False, help="Remove every group."),
    clear_tags: bool = typer.Option(False, help="Remove every tag."),
    api_url: str = API_URL, token: str = TOKEN,
) -> None:
    """Set a device's groups and/or tags (operator role)."""
    body: dict = {}
    if group or clear_groups:
        body["groups"] = _csv(group)
    if tags or clear_tags:
        body["tags"] = _csv(tags)
    if not body:
        console.print("[red]error:[/] nothing to change: pass --group, --tags, --clear-groups or --clear-tags")
        raise typer.Exit(2)
    d = _call(api_url, token, "PATCH", f"/api/v1/devices/{device_id}", json=body)
    console.print(f"{d['id']}: groups {d['groups'] or '-'}, tags {d['tags'] or '-'}", highlight=False)


@devices_app.command("add")
def devices_add(device_id: str, api_url: str = API_URL, token: str = TOKEN,
                group: list[str] = typer.Option(None, "--group", "-g", help="Groups (repeatable, or a,b)."),
                tags: list[str] = typer.Option(None, "--tags", "-t", help="Tags (a,b; repeatable)."),
                out: str = typer.Option(None, help="Write the credentials JSON here (0600).")) -> None:
    """Provision (or re-key) a device directly; prints its credentials once (admin role)."""
    body: dict = {"device_id": device_id}
    if group:
        body["groups"] = _csv(group)
    if tags:
        body["tags"] = _csv(tags)
    creds = _call(api_url, token, "POST", "/api/v1/devices", json=body)
    if out:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(creds, fh, indent=2)
        console.print(f"credentials for {device_id} written to {out}")
    else:
        sys.stdout.write(json.dumps(creds, indent=2) + "\n")


@devices_app.command("list")
def devices_list(
    group: list[str] = typer.Option(None, "--group", "-g", help="In any of these groups."),
    tag: list[str] = typer.Option(None, "--tag", "-t", help="Carrying all of these tags."),
    online: bool = typer.Option(None, "--online/--offline", help="Only online / only offline devices."),
    gpu: str = typer.Option(None, "--gpu-cc", help="GPU compute capability, e.g. 8.7."),
    limit: int = typer.Option(100, min=1, max=1000), offset: int = typer.Option(0, min=0),
    api_url: str = API_URL, token: str = TOKEN,
) -> None:
    """The fleet inventory (viewer role)."""
    params: dict = {"group": _csv(group), "tag": _csv(tag), "limit": limit, "offset": offset}
    if online is not None:
        params["online"] = str(online).lower()
    if gpu:
        params["gpu_compute_capability"] = gpu
    data = _call(api_url, token, "GET", "/api/v1/devices", params=params)
    table = Table("device", "online", "groups", "tags", "gpu cc", "agent", "active", "candidate", "state",
                  "last seen")
    for d in data["items"]:
        online_text = "revoked" if d.get("revoked") else "yes" if d["online"] else "no"
        table.add_row(d["id"], online_text, ",".join(d.get("groups", [])), ",".join(d.get("tags", [])),
                      str((d.get("hardware") or {}).get("gpu_compute_capability") or "–"), d["agent_version"] or "–",
                      str(d["active_version"] or "–"), str(d["candidate_version"] or "–"), d["update_state"] or "–",
                      str(d["last_seen"] or "never"))
    console.print(table)
    if data["total"] > offset + len(data["items"]):
        console.print(f"{offset + 1}-{offset + len(data['items'])} of {data['total']}: --offset for more")


@devices_app.command("revoke")
def devices_revoke(device_id: str, api_url: str = API_URL, token: str = TOKEN) -> None:
    """Revoke a device: broker user and API tokens removed (admin role)."""
    _call(api_url, token, "DELETE", f"/api/v1/devices/{device_id}")
    console.print(f"{device_id} revoked")


@models_app.command("list")
def models_list(api_url: str = API_URL, token: str = TOKEN) -> None:
    data = _call(api_url, token, "GET", "/api/v1/models")
    if not data["items"]:
        console.print("no models registered yet: `edgeloop models register` a seed model, or run `edgeloop demo`")
        return
    table = Table("version", "status", "aliases", "golden mAP50", "golden mAP50-95", "parent", "snapshot")
    for m in data["items"]:
        g = m["metrics"].get("golden", {})
        table.add_row(str(m["version"]), m["status"], ",".join(m["aliases"]),
                      f"{g.get('map50', float('nan')):.3f}", f"{g.get('map50_95', float('nan')):.3f}",
                      str(m["parent_version"] or "–"), (m["snapshot_id"] or "–")[:12])
    console.print(table)


@models_app.command("register")
def models_register(
    weights: Path = typer.Option(..., exists=True, dir_okay=False, help="Ultralytics .pt weights."),
    onnx: Path = typer.Option(..., exists=True, dir_okay=False, help="The ONNX export that ships."),
    imgsz: int = typer.Option(..., help="Input size the model was exported at."),
    metrics: Path = typer.Option(None, exists=True, dir_okay=False,
                                 help="JSON {eval set: {map50, map50_95, ...}}, e.g. the golden set's."),
    api_url: str = API_URL, token: str = TOKEN,
) -> None:
    """Register an externally trained model (e.g. the seed) as production: signed bundle + registry (engineer)."""
    with weights.open("rb") as pt, onnx.open("rb") as model:
        result = _call(api_url, token, "POST", "/api/v1/models", files={"weights": pt, "onnx": model},
                       data={"imgsz": str(imgsz), "metrics": metrics.read_text() if metrics else "{}"})
    console.print(f"registered version {result['version']} as production")


@models_app.command("show")
def models_show(version: int, api_url: str = API_URL, token: str = TOKEN) -> None:
    """Full record of one version: metrics, gate decision, lineage, hyperparameters."""
    sys.stdout.write(json.dumps(_call(api_url, token, "GET", f"/api/v1/models/{version}"), indent=2) + "\n")


@models_app.command("approve")
def models_approve(version: int, reason: str = typer.Option("", help="Why, for the audit log."),
                   api_url: str = API_URL, token: str = TOKEN) -> None:
    """Approve a candidate that passed its gate: it becomes production (operator)."""
    _call(api_url, token, "POST", f"/api/v1/models/{version}/approve", json={"reason": reason})
    console.print(f"version {version} approved: now production")


@models_app.command("rollback")
def models_rollback(reason: str = typer.Option("", help="Why, for the audit log."),
                    api_url: str = API_URL, token: str = TOKEN) -> None:
    """Make the previous production version production again, in one call (operator)."""
    result = _call(api_url, token, "POST", "/api/v1/models/rollback", json={"reason": reason})
    console.print(f"rolled back: version {result['to_version']} is production again "
                  f"(version {result['from_version']} marked rolled_back)")


@models_app.command("lineage")
def models_lineage(version: int, api_url: str = API_URL, token: str = TOKEN) -> None:
    """Model → job → dataset snapshots → images per device."""
    sys.stdout.write(json.dumps(_call(api_url, token, "GET", f"/api/v1/models/{version}/lineage"),
                                indent=2, default=str) + "\n")
