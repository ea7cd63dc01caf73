"""Frame sources: where the agent's frames come from.

``open_source(spec)`` understands:

* ``folder:/path`` (or a bare directory path) -- images in name order; a YOLO ``.txt`` beside an
  image is the line's QA correction for that frame.
* a video file path (``/data/line.mp4``, or ``file:/data/line.mp4``) -- ends, or loops.
* a stream URL (``rtsp://``, ``http(s)://``, ``rtmp://``, ``udp://``, ``tcp://``, ``srt://``) --
  read through OpenCV's FFmpeg backend with open/read timeouts, so a stalled stream cannot hang
  the loop; a dropped stream is reopened with exponential backoff.
* a camera index (``0``, ``usb:0``) -- a dropped camera is reopened with backoff too.
* ``<plugin>:<target>?k=v&...`` -- a frame-source plugin registered under the entry-point group
  ``edgeloop.frame_sources`` (the synthetic generator is ``synthetic:base?seed=1&labels=1``).

A plugin is a callable ``factory(target: str, params: dict[str, str], *, loop: bool)`` returning
an iterable of ``(frame_id, image_bgr_uint8, labels_or_None)`` tuples, labels as YOLO rows
``(cls, cx, cy, w, h)``. Plain tuples keep plugins free of any edge_agent import, so a package the
agent must not import (training) can still provide one.

Sources are iterables of :class:`Frame` and may block (a reconnect backoff sleeps). The agent
loop must keep serving commands and heartbeats meanwhile, so it reads through
:class:`FrameReader`, which runs the source in a thread and hands over frames with a timeout.
"""

from __future__ import annotations

import contextlib
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import cv2
import numpy as np
import structlog

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
PLUGIN_GROUP = "edgeloop.frame_sources"
_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*):(.*)$", re.DOTALL)

Label = tuple[int, float, float, float, float]


@dataclass(frozen=True)
class Frame:
    frame_id: str
    image: np.ndarray  # BGR
    # Ground truth (cls, cx, cy, w, h normalised) when the line supplied a correction.
    labels: list[Label] | None = None


class SourceError(RuntimeError):
    pass


class SourceEnded(Exception):
    """A finite source (a file or folder without loop) delivered its last frame."""


@dataclass(frozen=True)
class StreamOptions:
    """How live sources (stream URLs, cameras) are opened, read and reconnected."""

    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if min(self.open_timeout_s, self.read_timeout_s, self.initial_backoff_s) <= 0:
            raise ValueError("stream timeouts and backoff must be positive")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")


def read_yolo_labels(path: Path) -> list[Label] | None:
    if not path.exists():
        return None
    boxes = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise SourceError(f"{path}:{n}: expected 'class cx cy w h', got {line!r}")
        try:
            cls, coords = int(parts[0]), tuple(float(p) for p in parts[1:])
        except ValueError:
            raise SourceError(f"{path}:{n}: expected an integer class and four numbers, got {line!r}") from None
        if cls < 0 or not all(math.isfinite(v) for v in coords):
            raise SourceError(f"{path}:{n}: negative class id or non-finite coordinate in {line!r}")
        boxes.append((cls, *coords))
    return boxes


class FolderSource:
    def __init__(self, folder: Path, loop: bool = True) -> None:
        self._folder = Path(folder)
        self._loop = loop
        if not self._folder.is_dir():
            raise SourceError(f"source folder {self._folder} does not exist")

    def __iter__(self) -> Iterator[Frame]:
        while True:
            images = sorted(p for p in self._folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise SourceError(f"source folder {self._folder} holds no images")
            yielded = False
            for path in images:
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if image is None:
                    continue  # a half-written or corrupt file: skip, the line keeps running
                yielded = True
                yield Frame(path.stem, image, read_yolo_labels(path.with_suffix(".txt")))
            if not self._loop:
                return
            if not yielded:
                # Looping over a folder of only unreadable files would spin forever yielding nothing.
                raise SourceError(f"source folder {self._folder} holds no readable images")


def is_stream_url(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in STREAM_SCHEMES and "://" in uri


def _has_ffmpeg() -> bool:
    try:
        return bool(cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG))
    except AttributeError:  # pragma: no cover - very old OpenCV without the registry
        return True


class VideoSource:
    """A video file, stream URL or camera index through OpenCV.

    Files end (or loop, reopened at once). Live sources (URLs, cameras) never end on their own: a
    failed open or a failed read (dropped connection, read timeout, unplugged camera) releases the
    capture and reopens it after ``initial_backoff_s``, doubling per consecutive failure up to
    ``max_backoff_s`` and resetting once a frame arrives. ``reconnects`` counts reopens that
    succeeded after a failure; ``open_failures`` counts failed opens. Iteration stops when
    ``stop`` is set (checked between reads and during backoff).
    """

    def __init__(
        self,
        uri: str | int,
        loop: bool = True,
        max_backoff: float | None = None,
        *,
        options: StreamOptions | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        opts = options or StreamOptions()
        if max_backoff is not None:  # the older keyword, kept for callers that pass it
            opts = StreamOptions(opts.open_timeout_s, opts.read_timeout_s,
                                 min(opts.initial_backoff_s, max_backoff), max_backoff)
        self._uri: str | int = int(uri) if isinstance(uri, str) and uri.isdigit() else uri
        self._loop = loop
        self.options = opts
        self._external_stop = stop
        self._closed = threading.Event()
        self.live = isinstance(self._uri, int) or is_stream_url(str(self._uri))
        self.frames = 0
        self.reconnects = 0
        self.open_failures = 0
        self.drops = 0

    @property
    def uri(self) -> str | int:
        return self._uri

    def close(self) -> None:
        self._closed.set()

    def _stopped(self) -> bool:
        return self._closed.is_set() or (self._external_stop is not None and self._external_stop.is_set())

    def _open(self) -> Any:
        if isinstance(self._uri, int):
            # Camera backends (V4L2, ...) have their own timeouts and may refuse FFmpeg's params.
            return cv2.VideoCapture(self._uri)
        if self.live and _has_ffmpeg():
            o = self.options
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(o.open_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(o.read_timeout_s * 1000)]
            return cv2.VideoCapture(self._uri, cv2.CAP_FFMPEG, params)
        return cv2.VideoCapture(self._uri)

    def _wait(self, seconds: float) -> bool:
        """Sleep unless stopped; True when the source should keep going."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopped():
                return False
            self._closed.wait(min(left, 0.2))
        return not self._stopped()

    def __iter__(self) -> Iterator[Frame]:
        backoff = self.options.initial_backoff_s
        failed = False  # the last open or read failed: the next successful open is a reconnect
        while not self._stopped():
            cap = self._open()
            if not cap.isOpened():
                cap.release()
                if not self.live:
                    raise SourceError(f"cannot open video {self._uri!r}")
                self.open_failures += 1
                failed = True
                log.warning("source.open_failed", uri=_redact(self._uri), retry_in_s=backoff)
                if not self._wait(backoff):
                    return
                backoff = min(backoff * 2, self.options.max_backoff_s)
                continue
            if failed:
                self.reconnects += 1
                log.info("source.reconnected", uri=_redact(self._uri), reconnects=self.reconnects)
            got_any = False
            try:
                while not self._stopped():
                    ok, image = cap.read()
                    if not ok or image is None:
                        break
                    if not got_any:
                        got_any, failed, backoff = True, False, self.options.initial_backoff_s
                    self.frames += 1
                    yield Frame(f"f{self.frames:09d}", image)
            finally:
                cap.release()
            if self._stopped():
                return
            if not self.live:
                if not got_any:
                    raise SourceError(f"video {self._uri!r} holds no readable frames")
                if not self._loop:
                    return
                continue  # a file ends: start it over at once
            # A live source stopped delivering: a dropped connection, a read timeout, an unplugged camera.
            self.drops += 1
            failed = True
            log.warning("source.stream_dropped", uri=_redact(self._uri), frames=self.frames, retry_in_s=backoff)
            if not self._wait(backoff):
                return
            backoff = min(backoff * 2, self.options.max_backoff_s)

    def stats(self) -> dict[str, int]:
        return {"frames": self.frames, "reconnects": self.reconnects, "open_failures": self.open_failures,
                "drops": self.drops}


def _redact(uri: str | int) -> str | int:
    """Stream URLs often carry camera credentials (rtsp://user:pass@host): keep them out of logs."""
    if isinstance(uri, str) and "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


# ---------------------------------------------------------------------------------------------- plugins

PluginFactory = Callable[..., Iterable[tuple[str, np.ndarray, Any]]]


def discover_plugins() -> dict[str, Any]:
    """Entry points of the ``edgeloop.frame_sources`` group by name (not loaded yet).

    Walks every distribution rather than ``entry_points(group=...)``, which keeps only the first
    copy of each distribution on sys.path: a stale ``*.egg-info`` in the working directory of an
    editable checkout would otherwise hide the installed plugins.
    """
    found: dict[str, Any] = {}
    for dist in distributions():
        for ep in dist.entry_points.select(group=PLUGIN_GROUP):
            found.setdefault(ep.name, ep)
    return found


class PluginSource:
    """Frames from a plugin factory; checks what the plugin yields before the agent sees it."""

    def __init__(self, name: str, factory: PluginFactory, target: str, params: Mapping[str, str],
                 loop: bool = True) -> None:
        self.name = name
        self._factory = factory
        self._target = target
        self._params = dict(params)
        self._loop = loop

    def __iter__(self) -> Iterator[Frame]:
        try:
            items = iter(self._factory(self._target, dict(self._params), loop=self._loop))
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"frame source {self.name}:{self._target}: {exc}") from exc
        for item in items:
            try:
                frame_id, image, labels = item
            except (TypeError, ValueError):
                raise SourceError(f"frame source {self.name!r} yielded {type(item).__name__}, "
                                  "expected (frame_id, image, labels)") from None
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise SourceError(f"frame source {self.name!r} yielded a non-image for frame {frame_id!r}")
            yield Frame(str(frame_id), image, None if labels is None else [_label(row) for row in labels])


def _label(row: Any) -> Label:
    cls, cx, cy, w, h = row
    return (int(cls), float(cx), float(cy), float(w), float(h))


def _split_plugin_spec(rest: str) -> tuple[str, dict[str, str]]:
    target, _, query = rest.partition("?")
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError as exc:
        raise SourceError(f"cannot parse source parameters {query!r}: {exc}") from None
    return target, params


# ---------------------------------------------------------------------------------------------- opening


def open_source(
    spec: str,
    loop: bool = True,
    *,
    options: StreamOptions | None = None,
    stop: threading.Event | None = None,
    plugins: Mapping[str, Any] | None = None,
) -> Iterable[Frame]:
    """The frame source ``spec`` names (see the module docstring); raises SourceError if none fits.

    ``plugins`` maps scheme names to entry points or factories; by default the installed
    ``edgeloop.frame_sources`` entry points.
    """
    spec = spec.strip()
    if not spec:
        raise SourceError("no frame source configured (EDGELOOP_AGENT_SOURCE)")
    if spec.startswith("folder:"):
        return FolderSource(Path(spec[len("folder:"):]), loop=loop)
    if spec.isdigit():
        return VideoSource(int(spec), loop=loop, options=options, stop=stop)
    if spec.startswith("usb:"):
        index = spec[len("usb:"):]
        if not index.isdigit():
            raise SourceError(f"camera source {spec!r}: expected usb:<index>, e.g. usb:0")
        return VideoSource(int(index), loop=loop, options=options, stop=stop)
    if is_stream_url(spec):
        return VideoSource(spec, loop=loop, options=options, stop=stop)
    if spec.startswith("file:"):
        spec = spec[len("file:"):]
        if spec.startswith("//"):  # file:///data/x.mp4
            spec = spec[2:]
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, loop=loop)
    if path.is_file():
        return VideoSource(str(path), loop=loop, options=options, stop=stop)
    match = _SCHEME_RE.match(spec)
    if match and "/" not in match.group(1):
        name, rest = match.groups()
        known = discover_plugins() if plugins is None else dict(plugins)
        if name in known:
            entry = known[name]
            try:
                factory = entry.load() if hasattr(entry, "load") else entry
            except Exception as exc:  # a broken plugin install must say which plugin
                raise SourceError(f"frame source plugin {name!r} failed to load: {exc}") from exc
            target, params = _split_plugin_spec(rest)
            return PluginSource(name, factory, target, params, loop=loop)
        raise SourceError(
            f"unknown frame source scheme {name!r} in {spec!r}; known: folder, file, usb, "
            f"{', '.join(STREAM_SCHEMES)}" + (f", {', '.join(sorted(known))}" if known else "")
        )
    raise SourceError(f"frame source {spec!r} is not a folder, a video file, a stream URL or a camera index")


# ---------------------------------------------------------------------------------------------- reader


_END = object()


class FrameReader:
    """Runs a source in a thread so the agent loop waits for a frame at most ``timeout``.

    ``latest_only`` (for live sources) keeps just the newest frame: when inference is slower than
    the camera, stale frames are dropped (counted in ``stale_dropped``) instead of queueing up
    latency. Otherwise every frame is handed over in order and the source waits for the consumer.
    An error in the source is raised from :meth:`get`; the end of the source makes ``get`` raise
    :class:`SourceEnded`.
    """

    def __init__(self, source: Iterable[Frame], latest_only: bool | None = None, depth: int = 2) -> None:
        self.source = source
        self.latest_only = getattr(source, "live", False) if latest_only is None else latest_only
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1 if self.latest_only else depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._ended = False
        self.stale_dropped = 0
        self._thread = threading.Thread(target=self._run, name="frame-reader", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for frame in self.source:
                if self._stop.is_set():
                    return
                if self.latest_only:
                    with contextlib.suppress(queue.Empty):
                        self._queue.get_nowait()
                        self.stale_dropped += 1
                    with contextlib.suppress(queue.Full):  # only this thread puts: room was just made
                        self._queue.put_nowait(frame)
                elif not self._put(frame):
                    return
        except BaseException as exc:  # handed to the consumer, who decides
            self._error = exc
        self._put(_END)

    def get(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None if none arrived within ``timeout`` seconds."""
        if self._ended:
            raise SourceEnded
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._ended = True
            if self._error is not None:
                raise self._error
            raise SourceEnded
        return item

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        closer = getattr(self.source, "close", None)
        if closer is not None:
            closer()
        self._thread.join(timeout=timeout)

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_frames(reader: FrameReader, n: int, timeout: float) -> list[Frame]:
    """Up to ``n`` frames from ``reader`` within ``timeout`` seconds, fewer if it ends (tools, tests)."""
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(frames) < n and (left := deadline - time.monotonic()) > 0:
        try:
            frame = reader.get(timeout=min(left, 0.5))
        except SourceEnded:
            break
        if frame is not None:
            frames.append(frame)
    return frames
