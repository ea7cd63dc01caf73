"""Keep Ultralytics offline, enforced in code, and fast on CPU.

Ultralytics decides a lot at import time: whether it is online (a DNS probe), where its
settings file lives (``~/.config`` unless ``YOLO_CONFIG_DIR``), and it downloads a font on
the first dataset check unless one is present. :func:`offline_ultralytics` fixes all of that
*before* the import, and refuses to continue if something imported Ultralytics earlier with
other settings (the import-time decisions cannot be undone).

On top of the settings, an audit hook (:func:`sys.addaudithook`) refuses ``socket.connect`` /
``socket.getaddrinfo`` to non-loopback hosts while a :func:`network_guard` is active; the
training wrappers in :mod:`training.yolo` run inside one, so a download attempt fails at once
with :class:`NetworkBlockedError` instead of hanging on retries. The guard is process-wide
while active (audit hooks cannot be scoped to a thread); training runs in its own process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import os
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

#: Environment variable naming the default Ultralytics config dir of this project.
CONFIG_DIR_ENV = "EDGELOOP_YOLO_CONFIG_DIR"

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
_INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")

_lock = threading.Lock()
_hook_installed = False
_guard_depth = 0
_blocked: list[str] = []
_configured_dir: Path | None = None


class NetworkBlockedError(ConnectionError):
    """A network access to a non-loopback host was attempted inside a :func:`network_guard`."""


class UltralyticsAlreadyImportedError(RuntimeError):
    """Ultralytics was imported before :func:`offline_ultralytics` with other settings."""


def cpu_count() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_config_dir() -> Path:
    """``$EDGELOOP_YOLO_CONFIG_DIR`` or ``~/.cache/edgeloop/ultralytics``."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "edgeloop" / "ultralytics"


# ---------------------------------------------------------------------------------------------
# network guard


def _is_loopback(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes | bytearray):
        host = bytes(host).decode("ascii", "replace")
    name = str(host).strip().strip("[]").rstrip(".").lower()
    if name in {"", "localhost"} or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _audit_hook(event: str, args: tuple) -> None:
    if not _guard_depth or not event.startswith("socket."):
        return
    if event in ("socket.connect", "socket.sendto"):
        sock, address = args[0], args[1]
        if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            return  # AF_UNIX (torch shared memory, multiprocessing) and friends are local
        host = address[0] if isinstance(address, tuple) and address else address
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        host = args[0] if args else None
    else:
        return
    if _is_loopback(host):
        return
    what = f"{event} to {host!r}"
    _blocked.append(what)
    log.warning("blocked network access during offline training: %s", what)
    raise NetworkBlockedError(f"edgeloop training is offline: refused {what}")


def install_network_guard() -> None:
    """Install the audit hook once per process (inactive until a :func:`network_guard`)."""
    global _hook_installed
    with _lock:
        if not _hook_installed:
            sys.addaudithook(_audit_hook)
            _hook_installed = True


@contextlib.contextmanager
def network_guard() -> Iterator[None]:
    """Refuse non-loopback connects and name lookups in this process while inside."""
    global _guard_depth
    install_network_guard()
    with _lock:
        _guard_depth += 1
    try:
        yield
    finally:
        with _lock:
            _guard_depth -= 1


def guard_active() -> bool:
    return _guard_depth > 0


def blocked_attempts() -> list[str]:
    """What the guard refused so far in this process (for logs and tests)."""
    return list(_blocked)


# ---------------------------------------------------------------------------------------------
# Ultralytics setup


def _dejavu_font() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("matplotlib (an Ultralytics dependency) is not installed")
    for loc in spec.submodule_search_locations:
        font = Path(loc) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if font.is_file():
            return font
    raise RuntimeError("matplotlib's DejaVuSans.ttf was not found")


def _prepare_config_dir(config_dir: Path) -> Path:
    ul_dir = config_dir / "Ultralytics"
    ul_dir.mkdir(parents=True, exist_ok=True)
    font = None
    for name in _FONT_NAMES:
        target = ul_dir / name
        if not target.is_file() or target.stat().st_size == 0:
            font = font or _dejavu_font()
            tmp = target.with_name(f".{name}.tmp{os.getpid()}")
            shutil.copyfile(font, tmp)
            os.replace(tmp, target)
    return ul_dir


def _check_existing(ul: ModuleType, config_dir: Path) -> None:
    import ultralytics.utils as ul_utils

    problems = []
    if ul_utils.ONLINE:
        problems.append("it decided it is online (YOLO_OFFLINE was not set)")
    if Path(ul_utils.USER_CONFIG_DIR).resolve() != (config_dir / "Ultralytics").resolve():
        problems.append(f"its config dir is {ul_utils.USER_CONFIG_DIR}, not {config_dir / 'Ultralytics'}")
    if os.environ.get("YOLO_OFFLINE") != "1":
        problems.append("YOLO_OFFLINE is not 1")
    if problems:
        raise UltralyticsAlreadyImportedError(
            "ultralytics was imported before offline_ultralytics() with different settings: "
            + "; ".join(problems)
            + ". Call training.ultralytics_env.offline_ultralytics() before anything imports ultralytics."
        )


def _set_threads(n: int) -> None:
    import torch
    import ultralytics.utils as ul_utils
    import ultralytics.utils.torch_utils as ul_torch

    # select_device() resets torch threads to torch_utils.NUM_THREADS (cpu_count - 1) on CPU.
    ul_torch.NUM_THREADS = n
    ul_utils.NUM_THREADS = n
    torch.set_num_threads(n)


def offline_ultralytics(config_dir: Path | None = None, *, threads: int | None = None) -> ModuleType:
    """Import Ultralytics fully offline with its state in ``config_dir``; return the module.

    Idempotent for the same ``config_dir``. Raises :class:`UltralyticsAlreadyImportedError` if
    Ultralytics is already imported with other settings (or another config dir).
    """
    global _configured_dir
    config_dir = Path(config_dir or default_config_dir()).expanduser().resolve()
    threads = threads or cpu_count()
    install_network_guard()

    with _lock:
        if _configured_dir is not None and _configured_dir != config_dir:
            raise UltralyticsAlreadyImportedError(
                f"ultralytics is already configured with {_configured_dir}; cannot switch to {config_dir}"
            )
    if "ultralytics" in sys.modules:
        _check_existing(sys.modules["ultralytics"], config_dir)

    _prepare_config_dir(config_dir)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ.pop("ULTRALYTICS_API_KEY", None)  # no Platform uploads
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("YOLO_VERBOSE", "False")

    with network_guard():
        import ultralytics

        _check_existing(ultralytics, config_dir)
        from ultralytics.utils import SETTINGS

        wanted = {
            "sync": False,
            "api_key": "",
            "vscode_msg": False,
            "openvino_msg": False,
            "datasets_dir": str(config_dir / "datasets"),
            "weights_dir": str(config_dir / "weights"),
            "runs_dir": str(config_dir / "runs"),
            **dict.fromkeys(_INTEGRATIONS, False),
        }
        if any(SETTINGS.get(k) != v for k, v in wanted.items()):
            SETTINGS.update(wanted)
        _set_threads(threads)

    with _lock:
        _configured_dir = config_dir
    return ultralytics


def ensure_offline(config_dir: Path | None = None) -> ModuleType:
    """The configured Ultralytics module: reuse the current setup, else set up ``config_dir``."""
    return offline_ultralytics(config_dir or _configured_dir)
