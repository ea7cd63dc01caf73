"""``edgeloop simulate``: N simulated devices against a real server and broker, from one process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path

import typer

app = typer.Typer()


def _line(fleet, started: float) -> str:
    c = fleet.counters
    sent = sum(c.sent.values())
    states: dict[str, int] = {}
    for model in fleet.devices.values():
        states[model.state] = states.get(model.state, 0) + 1
    return (f"[{time.monotonic() - started:6.0f} s] connected {c.connected}/{len(fleet.clients)} "
            f"(offline by profile {len(fleet.offline)}) · sent {sent} {dict(sorted(c.sent.items()))} · "
            f"commands {dict(c.commands)} · states {dict(sorted(states.items()))} · "
            f"loop lag {fleet.loop_lag * 1000:.0f} ms")


@app.command("simulate")
def simulate(
    devices: int = typer.Option(100, "--devices", "-n", min=1, help="how many devices to simulate"),
    credentials: Path | None = typer.Option(None, help="JSON list of device credentials (as POST /devices returns)"),
    enroll: bool = typer.Option(False, "--enroll", help="enroll the devices through the API first (admin token)"),
    save_credentials: Path | None = typer.Option(None, help="with --enroll: write the new credentials here (0600)"),
    api_url: str | None = typer.Option(None, envvar="EDGELOOP_API_URL", help="the server, for --enroll and samples"),
    token: str | None = typer.Option(None, envvar="EDGELOOP_TOKEN", help="admin API token (for --enroll)"),
    prefix: str = typer.Option("sim", help="device id prefix for --enroll"),
    group: list[str] = typer.Option([], help="groups the enrolled devices join (repeatable)"),
    mqtt_host: str = typer.Option("127.0.0.1", envvar="EDGELOOP_MQTT_HOST"),
    mqtt_port: int = typer.Option(1883, envvar="EDGELOOP_MQTT_PORT"),
    heartbeat_seconds: float = typer.Option(5.0, min=0.1),
    shadow_seconds: float | None = typer.Option(
        None, min=0.1, help="one shadow window this often while shadowing (default: as an agent does, one per "
                            "the deploy's shadow_frames at the device's frame rate)"),
    drift_seconds: float = typer.Option(0.0, min=0.0, help="one drift window per device this often (0: none)"),
    samples_per_minute: float = typer.Option(0.0, min=0.0, help="sample events with uploaded images, per device"),
    offline: float = typer.Option(0.0, min=0.0, max=1.0, help="share of devices that never come online"),
    slow: float = typer.Option(0.0, min=0.0, max=1.0, help="share of devices whose updates take 8x longer"),
    refusing: float = typer.Option(0.0, min=0.0, max=1.0, help="share of devices that reject every bundle"),
    active_version: int = typer.Option(1, min=0, help="model version the devices start on (0: none)"),
    trusted_keys: Path | None = typer.Option(None, help="bundle public keys: rollbacks must be signed by one"),
    connects_per_second: float = typer.Option(400.0, min=1.0),
    duration: float | None = typer.Option(None, min=1.0, help="seconds to run (default: until Ctrl-C)"),
    json_out: Path | None = typer.Option(None, "--json", help="write the final counters here"),
    seed: int = typer.Option(0),
) -> None:
    """Run N simulated devices: own credentials, retained status with last will, heartbeats, shadow and
    drift windows, samples, and the OTA answers to deploy/promote/abort/rollback commands."""
    from edgeloop.simulator.credentials import device_ids, load_credentials
    from edgeloop.simulator.credentials import enroll as enroll_devices
    from edgeloop.simulator.credentials import save_credentials as save
    from edgeloop.simulator.device import FleetProfile
    from edgeloop.simulator.fleet import Fleet, FleetConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if enroll:
        if not api_url or not token:
            raise typer.BadParameter("--enroll needs --api-url and --token")
        started = time.monotonic()
        creds = enroll_devices(api_url, token, device_ids(devices, prefix), groups=group or None,
                               progress=lambda done, total: print(f"enrolled {done}/{total}", flush=True))
        print(f"enrolled {len(creds)} devices in {time.monotonic() - started:.1f} s", flush=True)
        if save_credentials is not None:
            save(save_credentials, creds)
    elif credentials is not None:
        creds = load_credentials(credentials)[:devices]
        if len(creds) < devices:
            print(f"{credentials} holds {len(creds)} devices; simulating those", file=sys.stderr)
    else:
        raise typer.BadParameter("give --credentials FILE or --enroll")
    verify = None
    if trusted_keys is not None:
        from firmware_bundles import TrustStore
        from firmware_bundles.commands import verify_command

        trust = TrustStore.from_path(trusted_keys)

        def verify(command):
            return verify_command(command, trust)

    config = FleetConfig(host=mqtt_host, port=mqtt_port, heartbeat_seconds=heartbeat_seconds,
                         shadow_seconds=shadow_seconds, drift_seconds=drift_seconds,
                         samples_per_minute=samples_per_minute, api_url=api_url,
                         connects_per_second=connects_per_second, active_version=active_version or None,
                         profile=FleetProfile(offline=offline, slow=slow, refusing=refusing, seed=seed), seed=seed)
    fleet = Fleet(creds, config, verify_rollback=verify)
    started = time.monotonic()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fleet.stop)  # say goodbye, then write the counters
        await fleet.run(duration, progress=lambda f: print(_line(f, started), flush=True))

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    print(_line(fleet, started), flush=True)
    if json_out is not None:
        json_out.write_text(json.dumps(fleet.counters.snapshot(), indent=1))
