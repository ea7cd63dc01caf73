"""Enrollment, the agent side: exchange a bootstrap token for this device's own credentials
(``POST /api/v1/enroll``) and keep them in the credentials file that
``AgentSettings.credentials_file`` reads.

The file is written atomically (temp file in the same folder, fsync, rename, fsync of the
folder) and is 0600 from its creation: the API token and broker password never sit in a
readable or half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import httpx

from protocol.api import ENROLL_PATH, DeviceCredentials, EnrollRequest, EnrollResponse
from protocol.messages import Hardware


class EnrollError(RuntimeError):
    """Enrollment refused or impossible; the message is the server's reason when it gave one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def enroll(
    client: httpx.Client, *, bootstrap_token: str, device_id: str, hardware: Hardware | None = None,
    agent_version: str = "",
) -> EnrollResponse:
    """POST the enrollment; ``client`` carries the server's base URL (and TLS settings)."""
    request = EnrollRequest(bootstrap_token=bootstrap_token, device_id=device_id, hardware=hardware,
                            agent_version=agent_version)
    try:
        response = client.post(ENROLL_PATH, json=request.model_dump(mode="json"))
    except httpx.HTTPError as exc:
        raise EnrollError(f"cannot reach the server at {client.base_url}: {exc}") from None
    if response.status_code != 201:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        hint = f" (retry after {response.headers['Retry-After']} s)" if "Retry-After" in response.headers else ""
        raise EnrollError(f"enrollment refused ({response.status_code}): {detail}{hint}", response.status_code)
    return EnrollResponse.model_validate(response.json())


def write_credentials(path: Path, creds: DeviceCredentials) -> Path:
    """Atomically write the credentials JSON with mode 0600 (never readable by others, even briefly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = DeviceCredentials.model_validate(creds.model_dump()).model_dump_json(indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mkstemp: 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def read_credentials(path: Path) -> DeviceCredentials:
    return DeviceCredentials.model_validate(json.loads(Path(path).read_text()))
