"""Bulk enrollment input: a CSV or JSON list of devices (id, groups, tags), checked whole.

Pure (no database, no broker): :func:`parse_csv` and :func:`parse_json` turn a request body into
:class:`BulkDevice` rows or raise :class:`BulkInputError` naming the first bad row, so that a
bulk call is refused before anything is written (server/fleet.py then provisions all of it in
one transaction and one broker batch).

CSV: a header row naming the columns, ``id`` (or ``device_id``) and optionally ``groups`` and
``tags``; in a cell, several labels are separated by ``;`` (or spaces, or commas inside a quoted
cell). Blank lines and lines starting with ``#`` are skipped. Rows are numbered as lines of the
file (the header is line 1). A cell states the device's whole list: an empty one means none.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from server.api.schemas import LABEL_PATTERN, MAX_LABELS

DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # as DeviceCreate (and protocol.validate_device_id)
BULK_MAX = 10_000  # devices in one call
MAX_BODY_BYTES = 8 * 1024 * 1024
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_LABEL = re.compile(LABEL_PATTERN)
_SPLIT = re.compile(r"[;,\s]+")
ID_COLUMNS = ("id", "device_id")
COLUMNS = {*ID_COLUMNS, "groups", "tags"}


class BulkInputError(ValueError):
    """A refused bulk body; ``row`` names where (``"line 7"``, ``"devices[3]"``) when known."""

    def __init__(self, message: str, row: str | None = None):
        super().__init__(f"{row}: {message}" if row else message)
        self.row = row


@dataclass(frozen=True)
class BulkDevice:
    """One device of a bulk call; ``None`` labels leave a re-keyed device's own as they are."""

    device_id: str
    groups: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None


def check_device(device_id: object, groups: object, tags: object, *, row: str) -> BulkDevice:
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise BulkInputError(f"invalid device id {device_id!r}: use 1-63 characters of a-z, 0-9, '-' and '_', "
                             "starting with a letter or digit", row)
    return BulkDevice(device_id, _labels(groups, "groups", row), _labels(tags, "tags", row))


def _labels(values: object, what: str, row: str) -> tuple[str, ...] | None:
    if values is None:
        return None
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise BulkInputError(f"{what} must be a list of strings", row)
    for value in values:
        if not _LABEL.fullmatch(value):
            raise BulkInputError(f"invalid label {value!r} in {what}: 1-64 of A-Z a-z 0-9 _ . : -, "
                                 "starting with a letter or digit", row)
    unique = tuple(sorted(set(values)))
    if len(unique) > MAX_LABELS:
        raise BulkInputError(f"{len(unique)} {what}, at most {MAX_LABELS}", row)
    return unique


def check_unique(devices: Sequence[BulkDevice], rows: Sequence[str], max_devices: int) -> list[BulkDevice]:
    if not devices:
        raise BulkInputError("no devices given")
    if len(devices) > max_devices:
        raise BulkInputError(f"{len(devices)} devices in one call, at most {max_devices}: split the list")
    first: dict[str, str] = {}
    for device, row in zip(devices, rows, strict=True):
        if device.device_id in first:
            raise BulkInputError(f"device {device.device_id!r} is also at {first[device.device_id]}", row)
        first[device.device_id] = row
    return list(devices)


def _decode(body: bytes | str) -> str:
    if isinstance(body, str):
        return body
    if len(body) > MAX_BODY_BYTES:
        raise BulkInputError(f"body of {len(body)} bytes is over the {MAX_BODY_BYTES}-byte limit")
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BulkInputError(f"not UTF-8 text (byte {exc.start})") from None


def parse_csv(body: bytes | str, *, max_devices: int = BULK_MAX) -> list[BulkDevice]:
    """Devices from a CSV body with a header row (see the module docstring)."""
    text = _decode(body)
    if "\0" in text:
        raise BulkInputError("the CSV contains a NUL character")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise BulkInputError("empty CSV: it needs a header row (id,groups,tags) and one row per device")
    header_no, header_line = lines[0]
    header = [h.strip().lower() for h in next(csv.reader([header_line]))]
    unknown = [h for h in header if h not in COLUMNS]
    if unknown or len(set(header)) != len(header):
        raise BulkInputError(f"the header names columns {header}: use id (or device_id), groups, tags, "
                             "each once", f"line {header_no}")
    id_columns = [h for h in header if h in ID_COLUMNS]
    if len(id_columns) != 1:
        raise BulkInputError("the header needs exactly one id (or device_id) column", f"line {header_no}")
    if len(lines) - 1 > max_devices:
        raise BulkInputError(f"{len(lines) - 1} devices in one call, at most {max_devices}: split the file")
    index = {h: i for i, h in enumerate(header)}
    devices, rows = [], []
    for number, line in lines[1:]:
        row = f"line {number}"
        try:
            cells = next(csv.reader([line]))
        except csv.Error as exc:
            raise BulkInputError(f"not CSV: {exc}", row) from None
        if len(cells) > len(header):
            raise BulkInputError(f"{len(cells)} cells, the header has {len(header)}", row)
        cells += [""] * (len(header) - len(cells))

        def cell(name: str, cells: list[str] = cells) -> list[str] | None:
            if name not in index:
                return None
            return [v for v in _SPLIT.split(cells[index[name]].strip()) if v]

        devices.append(check_device(cells[index[id_columns[0]]].strip(), cell("groups"), cell("tags"), row=row))
        rows.append(row)
    return check_unique(devices, rows, max_devices)


def parse_json(body: bytes | str | object, *, max_devices: int = BULK_MAX) -> list[BulkDevice]:
    """Devices from ``{"devices": [{"device_id", "groups", "tags"}, ...]}`` (or the bare list)."""
    if isinstance(body, bytes | str):
        try:
            body = json.loads(_decode(body))
        except ValueError as exc:
            raise BulkInputError(f"not JSON: {exc}") from None
    items = body.get("devices") if isinstance(body, dict) else body
    if isinstance(body, dict) and set(body) - {"devices"}:
        raise BulkInputError(f"unknown fields {sorted(set(body) - {'devices'})}: the body is {{\"devices\": [...]}}")
    if not isinstance(items, list):
        raise BulkInputError('the body is {"devices": [{"device_id": ..., "groups": [...], "tags": [...]}, ...]}')
    if len(items) > max_devices:
        raise BulkInputError(f"{len(items)} devices in one call, at most {max_devices}: split the list")
    devices, rows = [], []
    for i, item in enumerate(items):
        row = f"devices[{i}]"
        if not isinstance(item, dict):
            raise BulkInputError("each device is an object with device_id, groups, tags", row)
        extra = set(item) - {"device_id", "id", "groups", "tags"}
        if extra:
            raise BulkInputError(f"unknown fields {sorted(extra)}", row)
        devices.append(check_device(item.get("device_id", item.get("id")), item.get("groups"), item.get("tags"),
                                    row=row))
        rows.append(row)
    return check_unique(devices, rows, max_devices)


def to_csv(devices: Iterable[BulkDevice]) -> str:
    """The CSV :func:`parse_csv` reads (labels joined with ``;``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "groups", "tags"])
    for d in devices:
        writer.writerow([d.device_id, ";".join(d.groups or ()), ";".join(d.tags or ())])
    return out.getvalue()
