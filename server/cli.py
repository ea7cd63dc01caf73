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
rollout_app = typer.Typer(help="Roll a model version out in gated waves; watch, pause, resume, abort, roll back.",
                          no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
jobs_app = typer.Typer(help="Retrain jobs: a halted batch's rejects, and dropping them to continue.",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
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


@devices_app.command("enroll-bulk")
def devices_enroll_bulk(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True,
                                help="CSV with a header row id,groups,tags (labels in a cell: a;b), or a JSON "
                                     'file {"devices": [{"device_id": ..., "groups": [...], "tags": [...]}]}.'),
    out: Path = typer.Option(..., "--out", "-o", help="Write every device's credentials here (JSON, 0600)."),
    api_url: str = API_URL, token: str = TOKEN,
) -> None:
    """Provision (or re-key) many devices in one call, all or nothing (admin role). A bad row is
    refused, named, before anything is written; the credentials are shown only in --out."""
    data = path.read_bytes()
    is_json = path.suffix.lower() == ".json" or data.lstrip()[:1] in (b"{", b"[")
    result = _call(api_url, token, "POST", "/api/v1/devices/bulk", content=data, timeout=600,
                   headers={"Content-Type": "application/json" if is_json else "text/csv"})
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(result, fh, indent=2)
    console.print(f"{result['total']} device(s) provisioned ({result['created']} new, {result['rekeyed']} re-keyed); "
                  f"credentials written to {out}", highlight=False)


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
    """Approve a candidate that passed its gate (operator): production at once, or with auto-deploy
    when its rollout completes."""
    result = _call(api_url, token, "POST", f"/api/v1/models/{version}/approve", json={"reason": reason})
    if result.get("status") == "production":
        console.print(f"version {version} approved: now production")
    else:
        console.print(f"version {version} approved: it becomes production when its rollout completes")


@models_app.command("rollback")
def models_rollback(to: int | None = typer.Option(None, "--to", min=1, help="The version to go back to "
                                                   "(default: the production version before this one)."),
                    reason: str = typer.Option("", help="Why, for the audit log."),
                    api_url: str = API_URL, token: str = TOKEN) -> None:
    """Roll the fleet back to a version, in one call (operator): production moves, the rollout in
    the way is rolled back, every other device gets a signed rollback command."""
    body: dict = {"reason": reason} | ({"version": to} if to is not None else {})
    result = _call(api_url, token, "POST", "/api/v1/models/rollback", json=body)
    if result["registry_moved"]:
        console.print(f"rolled back: version {result['to_version']} is production again "
                      f"(version {result['from_version']} marked rolled_back)")
    else:
        console.print(f"version {result['to_version']} stays production")
    if result["rollout_rolled_back"] is not None:
        console.print(f"rollout {result['rollout_rolled_back']} rolled back: "
                      f"{len(result['reverted_by_rollout'])} device(s) revert with it")
    console.print(f"{len(result['commanded'])} device(s) sent a signed rollback command"
                  + (f", {len(result['offline'])} of them offline (they get it when back)" if result["offline"] else ""))
    if result["left"]:
        console.print(f"{len(result['left'])} device(s) busy elsewhere: {', '.join(result['left'])}")


@models_app.command("history")
def models_history(limit: int = typer.Option(50, min=1, max=1000), api_url: str = API_URL,
                   token: str = TOKEN) -> None:
    """Every move of the registry's aliases, newest first."""
    table = Table("at", "alias", "version", "from", "by", "reason")
    for row in _call(api_url, token, "GET", "/api/v1/aliases/history", params={"limit": limit})["items"]:
        table.add_row(str(row["at"])[:19], row["alias"], str(row["version"] or "-"),
                      str(row["from_version"] or "-"), row["actor"], row["reason"])
    console.print(table)


@models_app.command("lineage")
def models_lineage(version: int, api_url: str = API_URL, token: str = TOKEN) -> None:
    """Model → job → dataset snapshots → images per device."""
    sys.stdout.write(json.dumps(_call(api_url, token, "GET", f"/api/v1/models/{version}/lineage"),
                                indent=2, default=str) + "\n")


# ---------------------------------------------------------------------- rollouts


def parse_wave(text: str) -> dict:
    """``canary:1`` (a count), ``50%`` or ``half:50%`` (a cumulative share of the fleet)."""
    name, _, size = text.rpartition(":")
    size = size.strip()
    try:
        if size.endswith("%"):
            return {"name": name or size, "percent": float(size[:-1])}
        return {"name": name or f"{int(size)} devices", "count": int(size)}
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a wave like canary:1, 10% or half:50%") from None


def parse_gate(text: str) -> tuple[str, float | int | None]:
    """``min_frames=500``, ``max_latency_p99_ms=none``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise typer.BadParameter(f"{text!r} is not a gate like min_frames=500")
    value = value.strip().lower()
    if value in {"none", "null", ""}:
        return name.strip(), None
    try:
        return name.strip(), int(value) if value.lstrip("-").isdigit() else float(value)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: {value!r} is not a number") from None


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_rollout(r: dict) -> None:
    console.print(f"[bold]rollout {r['id']}[/]: version {r['version']} [bold]{r['state']}[/] "
                  f"({r['mode']}, on failure {r['on_failure']}{', approval per wave' if r['require_approval'] else ''})"
                  f", by {r['created_by']}", highlight=False)
    if r.get("reason"):
        console.print(f"  {r['reason']}", highlight=False)
    for wave in r["waves"]:
        size = f"{wave['percent']:g}%" if wave.get("percent") is not None else f"{wave['count']} device(s)"
        phase = f", {wave['phase']}" if wave.get("phase") and wave["state"] == "running" else ""
        counts = ", ".join(f"{n} {s}" for s, n in sorted(wave.get("device_counts", {}).items()))
        console.print(f"\nwave {wave['index']} [bold]{wave['name']}[/] ({size}): {wave['state']}{phase}"
                      f"{' – ' + counts if counts else ''}", highlight=False)
        verdict = wave.get("verdict") or {}
        why = verdict.get("reason") or wave.get("reason")
        if why:
            console.print(f"  {why}", highlight=False)
        if wave.get("gates"):
            gates = Table("gate", "value", "threshold", "passing")
            for g in wave["gates"]:
                mark = {True: "[green]yes[/]", False: "[red]no[/]"}.get(g["passed"], "–")
                gates.add_row(g["name"], _fmt(g["value"]), _fmt(g["threshold"]), mark)
            console.print(gates)
        if wave.get("devices"):
            devices = Table("device", "state", "agent state", "active", "frames", "agreement*", "accuracy",
                            "p99 ms", "errors", "reason")
            for d in wave["devices"]:
                s = d.get("shadow") or {}
                accuracy = (f"{_fmt(s.get('active_accuracy'))} → {_fmt(s.get('candidate_accuracy'))}"
                            if s.get("corrected_frames") else "–")
                devices.add_row(d["device_id"], d["state"], d["update_state"] or "–", _fmt(d["active_version"]),
                                _fmt(s.get("frames")), _fmt(s.get("confident_agreement")), accuracy,
                                _fmt(s.get("candidate_latency_ms_p99")), _fmt(s.get("errors")),
                                (d.get("reason") or "")[:60])
            console.print(devices)
    if any(w.get("devices") for w in r["waves"]):
        console.print("* agreement where the active model is confident", style="dim")


@rollout_app.command("create")
def rollout_create(
    version: str = typer.Argument("production", help="Registry version number, or 'production'."),
    group: list[str] = typer.Option(None, "--group", "-g", help="Devices in any of these groups (repeatable, a,b)."),
    tag: list[str] = typer.Option(None, "--tag", "-t", help="Devices carrying all of these tags (repeatable, a,b)."),
    device: list[str] = typer.Option(None, "--device", "-d", help="Only these devices (repeatable, a,b)."),
    gpu_cc: str = typer.Option(None, "--gpu-cc", help="GPU compute capability, e.g. 8.7."),
    trt: str = typer.Option(None, "--tensorrt", help="TensorRT version, e.g. 10.3.0."),
    wave: list[str] = typer.Option(None, "--wave", "-w", help="canary:1, 10%, half:50% ... in order (repeatable); "
                                                              "default: the server's waves."),
    gate: list[str] = typer.Option(None, "--gate", help="Override a gate, e.g. min_frames=500 (repeatable)."),
    direct: bool = typer.Option(False, "--direct", help="Install and switch without shadowing first."),
    on_failure: str = typer.Option(None, "--on-failure", help="pause or abort when a wave fails its gates."),
    require_approval: bool = typer.Option(False, "--require-approval", help="Each wave waits for `approve`."),
    reason: str = typer.Option("", "--reason", "-r", help="Why (audit log)."),
    api_url: str = API_URL, token: str = TOKEN,
) -> None:
    """Start a rollout of a model version in gated waves (operator role)."""
    selector: dict = {"groups": _csv(group), "tags": _csv(tag), "devices": _csv(device)}
    if gpu_cc:
        selector["gpu_compute_capability"] = gpu_cc
    if trt:
        selector["tensorrt_version"] = trt
    body: dict = {"version": version if version == "production" else int(version), "selector": selector,
                  "gates": dict(parse_gate(g) for g in gate or []), "require_approval": require_approval,
                  "reason": reason}
    if wave:
        body["waves"] = [parse_wave(w) for w in wave]
    if direct:
        body["mode"] = "direct"
    if on_failure:
        body["on_failure"] = on_failure
    r = _call(api_url, token, "POST", "/api/v1/rollouts", json=body)
    waves = " → ".join(w["name"] for w in r["waves"])
    console.print(f"rollout {r['id']} of version {r['version']}: {waves}; {r['state']}", highlight=False)


@rollout_app.command("list")
def rollout_list(state: str = typer.Option(None, "--state", help="Only rollouts in this state."),
                 limit: int = typer.Option(20, min=1, max=200), offset: int = typer.Option(0, min=0),
                 api_url: str = API_URL, token: str = TOKEN) -> None:
    """Rollouts, newest first (viewer role)."""
    params: dict = {"limit": limit, "offset": offset}
    if state:
        params["state"] = state
    data = _call(api_url, token, "GET", "/api/v1/rollouts", params=params)
    table = Table("id", "version", "state", "waves", "created by", "created", "reason")
    for r in data["items"]:
        waves = " ".join(f"{w['name']}:{w['state']}" for w in r["waves"])
        table.add_row(str(r["id"]), str(r["version"]), r["state"], waves, r["created_by"], str(r["created_at"])[:19],
                      (r.get("reason") or "")[:60])
    console.print(table)
    if data["total"] > offset + len(data["items"]):
        console.print(f"{offset + 1}-{offset + len(data['items'])} of {data['total']}: --offset for more")


@rollout_app.command("show")
def rollout_show(rollout_id: int, as_json: bool = typer.Option(False, "--json", help="The raw JSON."),
                 watch: bool = typer.Option(False, "--watch", help="Refresh every 2 s until it finishes."),
                 api_url: str = API_URL, token: str = TOKEN) -> None:
    """One rollout: waves, each gate's value against its threshold, devices (viewer role)."""
    while True:
        r = _call(api_url, token, "GET", f"/api/v1/rollouts/{rollout_id}")
        if as_json:
            sys.stdout.write(json.dumps(r, indent=2, default=str) + "\n")
        else:
            if watch:
                console.clear()
            print_rollout(r)
        if not watch or r["state"] in {"succeeded", "aborted", "rolled_back"} and r.get("settled"):
            return
        time.sleep(2)


def _rollout_action(action: str, rollout_id: int, reason: str, api_url: str, token: str) -> None:
    r = _call(api_url, token, "POST", f"/api/v1/rollouts/{rollout_id}/{action}", json={"reason": reason})
    console.print(f"rollout {r['id']}: {r['state']}" + (f" ({r['reason']})" if r.get("reason") else ""),
                  highlight=False)


_REASON = typer.Option("", "--reason", "-r", help="Why (audit log).")


@rollout_app.command("approve")
def rollout_approve(rollout_id: int, reason: str = _REASON, api_url: str = API_URL, token: str = TOKEN) -> None:
    """Start the next wave of a rollout waiting for approval (operator role)."""
    _rollout_action("approve", rollout_id, reason, api_url, token)


@rollout_app.command("pause")
def rollout_pause(rollout_id: int, reason: str = _REASON, api_url: str = API_URL, token: str = TOKEN) -> None:
    """No new deploys or promotions; devices in shadow keep shadowing (operator role)."""
    _rollout_action("pause", rollout_id, reason, api_url, token)


@rollout_app.command("resume")
def rollout_resume(rollout_id: int, reason: str = _REASON, api_url: str = API_URL, token: str = TOKEN) -> None:
    """Carry on; a wave that failed its gates runs again (operator role)."""
    _rollout_action("resume", rollout_id, reason, api_url, token)


@rollout_app.command("abort")
def rollout_abort(rollout_id: int, reason: str = _REASON, api_url: str = API_URL, token: str = TOKEN) -> None:
    """Stop: devices not yet switched drop the candidate; switched ones keep it (operator role)."""
    _rollout_action("abort", rollout_id, reason, api_url, token)


@rollout_app.command("rollback")
def rollout_rollback(rollout_id: int, reason: str = _REASON, api_url: str = API_URL, token: str = TOKEN) -> None:
    """Every device of the rollout back to the version it ran before (operator role)."""
    _rollout_action("rollback", rollout_id, reason, api_url, token)


@jobs_app.command("rejects")
def jobs_rejects(job_id: int, limit: int = typer.Option(100, min=1, max=1000), offset: int = typer.Option(0, min=0),
                 as_json: bool = typer.Option(False, "--json", help="The raw JSON."),
                 api_url: str = API_URL, token: str = TOKEN) -> None:
    """The samples the data contract rejected in a job's batch: sample, device, reason (viewer role)."""
    data = _call(api_url, token, "GET", f"/api/v1/jobs/{job_id}/rejects", params={"limit": limit, "offset": offset})
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    if data["halted"]:
        resolved = data.get("resolved")
        state = (f"resolved by {resolved['by']}: {resolved['dropped']} dropped ({resolved['reason']})" if resolved
                 else f"unresolved: `edgeloop jobs resolve-halt {job_id} --reason ...` drops them and continues")
        console.print(f"job #{job_id} halted: {data['halt_reason']}; {state}", highlight=False)
    table = Table("sample", "device", "status", "reason")
    for r in data["items"]:
        table.add_row(r["sample_id"], r["device_id"] or "–", r["status"], r["reason"])
    console.print(table)
    shown = offset + len(data["items"])
    console.print(f"{offset + 1 if data['items'] else 0}-{shown} of {data['total']} rejects"
                  + (": --offset for more" if data["total"] > shown else ""), highlight=False)


@jobs_app.command("resolve-halt")
def jobs_resolve_halt(job_id: int,
                      reason: str = typer.Option(..., "--reason", "-r", help="Why the rejects may be dropped "
                                                                                  "(audit log; 3-2000 characters)."),
                      api_url: str = API_URL, token: str = TOKEN) -> None:
    """Drop the rejects of a batch the data contract halted and queue the retrain that continues it (operator)."""
    r = _call(api_url, token, "POST", f"/api/v1/jobs/{job_id}/resolve-halt", json={"reason": reason})
    console.print(f"job #{r['job_id']}: halt resolved, {r['dropped']} rejected samples dropped; "
                  f"job #{r['next_job_id']} {r['next_job_status']} continues", highlight=False)
