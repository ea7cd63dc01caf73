"""Live stream sources against a real HTTP server: OpenCV's FFmpeg backend reads the stream, the
server goes away mid-stream and comes back on the same port, and frames keep coming.

Two kinds of stream, both read by this OpenCV build's FFmpeg backend over plain HTTP:
* an MJPEG ``multipart/x-mixed-replace`` stream (what IP cameras serve), endless;
* a video file (MJPG in AVI, written with cv2.VideoWriter) served over HTTP, sent slowly so the
  server can cut it mid-file.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.sources import FrameReader, StreamOptions, VideoSource, open_source, wait_for_frames

FAST = StreamOptions(open_timeout_s=3, read_timeout_s=1, initial_backoff_s=0.2, max_backoff_s=1)


class _Server:
    """A threaded HTTP server that can be stopped (cutting open connections) and restarted on its port."""

    def __init__(self, video: Path) -> None:
        self.video = video
        self.port = _free_port()
        self.alive = threading.Event()
        self.stalled = threading.Event()
        self.requests = 0
        self._httpd: http.server.ThreadingHTTPServer | None = None

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests += 1
                if self.path.startswith("/live.mjpg"):
                    self._mjpeg()
                elif self.path == "/clip.avi":
                    self._file()
                else:
                    self.send_error(404)

            def _mjpeg(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                while server.alive.is_set():
                    if server.stalled.is_set():
                        time.sleep(0.05)  # connection open, nothing sent: a stalled camera
                        continue
                    jpg = cv2.imencode(".jpg", np.full((24, 32, 3), (i * 16) % 256, np.uint8))[1].tobytes()
                    head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpg)}\r\n\r\n"
                    try:
                        self.wfile.write(head.encode() + jpg + b"\r\n")
                    except OSError:
                        return
                    i += 1
                    time.sleep(0.02)

            def _file(self) -> None:
                data = server.video.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "video/x-msvideo")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for offset in range(0, len(data), 2048):
                    if not server.alive.is_set():
                        return  # cut mid-file: the client sees a short body
                    try:
                        self.wfile.write(data[offset:offset + 2048])
                    except OSError:
                        return
                    time.sleep(0.01)

        return Handler

    def start(self) -> None:
        self.alive.set()
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        httpd.daemon_threads = True
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, name="test-http", daemon=True).start()

    def stop(self) -> None:
        self.alive.clear()  # open handlers stop sending and close their connections
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()  # new connections are refused until start()
            self._httpd = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened(), "this OpenCV build cannot write MJPG/AVI"
    for i in range(120):
        frame = np.zeros((48, 64, 3), np.uint8)
        cv2.putText(frame, str(i), (2, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
        writer.write(frame)
    writer.release()
    srv = _Server(video)
    srv.start()
    yield srv
    srv.stop()


def _cut_and_restore(server: _Server, reader: FrameReader, source: VideoSource, down_s: float) -> int:
    """Stop the server, wait until the source saw the drop, restart; the frames read before the cut."""
    server.stop()
    deadline = time.monotonic() + 30
    while source.drops == 0 and time.monotonic() < deadline:  # the reader noticed the cut
        reader.get(timeout=0.2)
    assert source.drops >= 1, "the source never noticed the server going away"
    frames_at_cut = source.frames
    time.sleep(down_s)  # stays down across at least one failed reconnect
    server.start()
    return frames_at_cut


def test_ffmpeg_backend_reads_http() -> None:
    assert cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG), "OpenCV without FFmpeg cannot read stream URLs"


def test_mjpeg_stream_reconnects_after_the_server_restarts(server: _Server) -> None:
    source = open_source(server.url("/live.mjpg"), options=FAST)
    assert isinstance(source, VideoSource) and source.live
    with FrameReader(source) as reader:
        before = wait_for_frames(reader, 10, timeout=30)
        assert len(before) == 10
        assert before[0].image.shape == (24, 32, 3)
        _cut_and_restore(server, reader, source, down_s=1.0)
        after = wait_for_frames(reader, 10, timeout=60)
    assert len(after) == 10, f"no frames after the restart ({source.stats()})"
    assert source.reconnects >= 1
    assert source.open_failures >= 1  # the server was down for at least one attempt
    assert server.requests >= 2


def test_video_file_over_http_cut_mid_file_resumes(server: _Server) -> None:
    source = VideoSource(server.url("/clip.avi"), options=FAST)
    assert source.live  # a URL is read as a stream: its end means reconnect
    with FrameReader(source, latest_only=False) as reader:
        before = wait_for_frames(reader, 5, timeout=30)
        assert len(before) == 5
        frames_at_cut = _cut_and_restore(server, reader, source, down_s=0.5)
        after = wait_for_frames(reader, 5, timeout=60)
    assert frames_at_cut < 120  # the first pass was cut short, not read to its end
    assert len(after) == 5
    assert source.reconnects >= 1


def test_stalled_stream_times_out_and_reconnects(server: _Server) -> None:
    source = VideoSource(server.url("/live.mjpg"), options=FAST)
    with FrameReader(source) as reader:
        assert len(wait_for_frames(reader, 3, timeout=30)) == 3
        server.stalled.set()  # the connection stays open but carries nothing
        deadline = time.monotonic() + 30
        while source.drops == 0 and time.monotonic() < deadline:
            reader.get(timeout=0.2)
        assert source.drops >= 1, "the read timeout never fired on a stalled stream"
        server.stalled.clear()
        assert len(wait_for_frames(reader, 3, timeout=60)) == 3
    assert source.reconnects >= 1
