"""The simulated devices' own credentials: from a file, or enrolled through the server's API.

The file is a JSON list of what ``POST /api/v1/devices`` returns per device
(``{device_id, api_token, mqtt_username, mqtt_password}``; extra keys are ignored), so a fleet
enrolled once can be simulated again without re-keying it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.api import API_PREFIX


@dataclass(frozen=True)
class Credential:
    device_id: str
    mqtt_username: str
    mqtt_password: str
    api_token: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> Credential:
        try:
            return cls(device_id=data["device_id"], mqtt_username=data.get("mqtt_username") or data["device_id"],
                       mqtt_password=data["mqtt_password"], api_token=data.get("api_token") or "")
        except KeyError as exc:
            raise ValueError(f"a credential needs {exc.args[0]!r}: {sorted(data)}") from None


def load_credentials(path: str | os.PathLike[str]) -> list[Credential]:
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("devices") or data.get("items") or []
    return [Credential.from_dict(item) for item in data]


def save_credentials(path: str | os.PathLike[str], credentials: list[Credential]) -> None:
    """Written 0600: these are the devices' secrets."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump([asdict(c) for c in credentials], out, indent=1)


def device_ids(count: int, prefix: str = "sim", start: int = 0) -> list[str]:
    width = max(5, len(str(start + count)))
    return [f"{prefix}-{i:0{width}d}" for i in range(start, start + count)]


def enroll(api_url: str, admin_token: str, ids: list[str], *, groups: list[str] | None = None,
           progress: Callable[[int, int], None] | None = None, batch: int = 500) -> list[Credential]:
    """Provision (or re-key) every id through the API with an admin token. Uses the bulk endpoint
    ``POST /api/v1/devices/bulk`` when the server has it, else one ``POST /api/v1/devices`` each."""
    import httpx

    out: list[Credential] = []
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=300) as http:
        bulk = True
        for i in range(0, len(ids), batch):
            chunk = ids[i:i + batch]
            if bulk:
                response = http.post(f"{API_PREFIX}/devices/bulk", json={
                    "devices": [{"device_id": d, **({"groups": groups} if groups else {})} for d in chunk]})
                if response.status_code in (404, 405):
                    bulk = False  # a server without bulk enrollment
                else:
                    response.raise_for_status()
                    body = response.json()
                    items = body.get("devices") or body.get("items") if isinstance(body, dict) else body
                    out += [Credential.from_dict(item) for item in items]
            if not bulk:
                for device_id in chunk:
                    body = {"device_id": device_id, **({"groups": groups} if groups else {})}
                    response = http.post(f"{API_PREFIX}/devices", json=body)
                    response.raise_for_status()
                    out.append(Credential.from_dict(response.json()))
                    if progress is not None and len(out) % 100 == 0:
                        progress(len(out), len(ids))
            if progress is not None:
                progress(len(out), len(ids))
    return out
