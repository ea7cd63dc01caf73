"""Frame sources: the folder source with sibling YOLO labels, the label reader, video files, the
reconnect/backoff logic of live sources (against a scripted capture), plugins (the synthetic
generator through its entry point), and the threaded reader the agent loop uses."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent import sources
from edge_agent.sources import (
    FolderSource,
    Frame,
    FrameReader,
    PluginSource,
    SourceEnded,
    SourceError,
    StreamOptions,
    VideoSource,
    discover_plugins,
    open_source,
    read_yolo_labels,
    wait_for_frames,
)


def _write_image(path: Path, value: int, size=(24, 32)) -> np.ndarray:
    image = np.full((*size, 3), value, dtype=np.uint8)
    image[0, 0] = (value, 255 - value, 7)
    assert cv2.imwrite(str(path), image)
    return image


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "frames"
    d.mkdir()
    _write_image(d / "a.png", 10)
    _write_image(d / "b.png", 20)
    _write_image(d / "c.jpg", 30)
    (d / "a.txt").write_text("0 0.5 0.5 0.2 0.3\n1 0.1 0.2 0.05 0.05\n")
    (d / "c.txt").write_text("")  # labelled, no objects
    (d / "notes.md").write_text("not an image")
    return d


def test_read_yolo_labels(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("0 0.5 0.5 0.2 0.3\n\n  \n12 1e-1 0.25 0.5 0.75\n")
    assert read_yolo_labels(path) == [(0, 0.5, 0.5, 0.2, 0.3), (12, 0.1, 0.25, 0.5, 0.75)]
    assert isinstance(read_yolo_labels(path)[0][0], int)


def test_read_yolo_labels_missing_file_is_none_and_empty_file_is_empty(tmp_path: Path) -> None:
    assert read_yolo_labels(tmp_path / "missing.txt") is None
    (tmp_path / "empty.txt").write_text("")
    assert read_yolo_labels(tmp_path / "empty.txt") == []


@pytest.mark.parametrize(
    "bad_line",
    ["0 0.5 0.5 0.2", "0 0.5 0.5 0.2 0.3 0.9", "cat 0.5 0.5 0.2 0.3", "0 0.5 abc 0.2 0.3", "1.5 0.5 0.5 0.2 0.3",
     "-1 0.5 0.5 0.2 0.3", "0 nan 0.5 0.2 0.3", "0 0.5 0.5 inf 0.3"],
)
def test_malformed_label_line_names_file_and_line(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "labels.txt"
    path.write_text(f"0 0.5 0.5 0.2 0.3\n{bad_line}\n")
    with pytest.raises(SourceError) as info:
        read_yolo_labels(path)
    assert f"{path}:2:" in str(info.value)


def test_folder_source_reads_images_in_order_with_sibling_labels(folder: Path) -> None:
    frames = list(FolderSource(folder, loop=False))
    assert [f.frame_id for f in frames] == ["a", "b", "c"]
    assert all(isinstance(f, Frame) for f in frames)
    a, b, c = frames
    assert a.image.shape == (24, 32, 3) and a.image.dtype == np.uint8
    assert tuple(a.image[0, 0]) == (10, 245, 7)  # BGR, lossless PNG
    assert a.labels == [(0, 0.5, 0.5, 0.2, 0.3), (1, 0.1, 0.2, 0.05, 0.05)]
    assert b.labels is None  # no .txt: no QA correction for this frame
    assert c.labels == []  # .txt present but empty: the frame is known to hold nothing


def test_folder_source_skips_a_corrupt_image(folder: Path) -> None:
    (folder / "b2.jpg").write_bytes(b"\xff\xd8 half written")
    assert [f.frame_id for f in FolderSource(folder, loop=False)] == ["a", "b", "c"]


def test_folder_source_loops(folder: Path) -> None:
    ids = [f.frame_id for f in itertools.islice(FolderSource(folder, loop=True), 7)]
    assert ids == ["a", "b", "c", "a", "b", "c", "a"]


def test_folder_source_without_loop_stops(folder: Path) -> None:
    source = FolderSource(folder, loop=False)
    assert len(list(source)) == 3
    assert len(list(source)) == 3  # iterating again starts over


def test_folder_source_picks_up_new_images_on_the_next_pass(folder: Path) -> None:
    it = iter(FolderSource(folder, loop=True))
    assert [next(it).frame_id for _ in range(3)] == ["a", "b", "c"]
    _write_image(folder / "d.bmp", 40)
    assert [next(it).frame_id for _ in range(4)] == ["a", "b", "c", "d"]


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        FolderSource(tmp_path / "nope")


def test_folder_without_images_raises(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(SourceError, match="no images"):
        list(FolderSource(tmp_path, loop=False))


@pytest.mark.timeout(20)
def test_looping_over_only_unreadable_images_raises_instead_of_spinning(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    (tmp_path / "y.png").write_bytes(b"")
    assert list(FolderSource(tmp_path, loop=False)) == []
    with pytest.raises(SourceError, match="no readable images"):
        next(iter(FolderSource(tmp_path, loop=True)))


def test_bad_label_file_surfaces_as_source_error(folder: Path) -> None:
    (folder / "b.txt").write_text("0 0.5 0.5\n")
    it = iter(FolderSource(folder, loop=False))
    assert next(it).frame_id == "a"
    with pytest.raises(SourceError, match="b.txt:1"):
        next(it)


def _write_video(path: Path, n: int = 5, fourcc: str = "MJPG") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (32, 24))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((24, 32, 3), 40 * i, dtype=np.uint8))
    writer.release()
    return path


def test_open_source(folder: Path, tmp_path: Path) -> None:
    assert isinstance(open_source(f"folder:{folder}", loop=False), FolderSource)
    assert isinstance(open_source(str(folder)), FolderSource)  # a bare directory is a folder source
    with pytest.raises(SourceError, match="no frame source"):
        open_source("")
    with pytest.raises(SourceError, match="no frame source"):
        open_source("   ")


@pytest.mark.parametrize("spec", ["rtsp://camera/stream", "http://10.0.0.5:8080/video.mjpg",
                                  "https://cam/live", "RTSP://CAM/x", "udp://239.0.0.1:1234"])
def test_open_source_stream_urls_are_live(spec: str) -> None:
    source = open_source(spec)
    assert isinstance(source, VideoSource) and source.live and source.uri == spec


@pytest.mark.parametrize("spec", ["0", "usb:0", "usb:2"])
def test_open_source_camera_index(spec: str) -> None:
    source = open_source(spec)
    assert isinstance(source, VideoSource) and source.live
    assert source.uri == int(spec.removeprefix("usb:"))


def test_open_source_video_file(tmp_path: Path) -> None:
    video = _write_video(tmp_path / "line.avi")
    for spec in (str(video), f"file:{video}", f"file://{video}"):
        source = open_source(spec, loop=False)
        assert isinstance(source, VideoSource) and not source.live and source.uri == str(video)


@pytest.mark.parametrize(("spec", "message"), [
    ("usb:front", "usb:<index>"),
    ("/no/such/video.mp4", "not a folder, a video file"),
    ("nosuchplugin:x?a=1", "unknown frame source scheme 'nosuchplugin'"),
])
def test_open_source_refuses_what_it_cannot_read(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_source(spec)


def test_video_file_ends_or_loops(tmp_path: Path) -> None:
    video = _write_video(tmp_path / "clip.avi", n=5)
    once = list(VideoSource(str(video), loop=False))
    assert len(once) == 5
    assert [round(int(f.image[0, 0, 0]) / 40) for f in once] == [0, 1, 2, 3, 4]  # MJPG is lossy, order is not
    assert all(f.labels is None for f in once)
    looped = list(itertools.islice(VideoSource(str(video), loop=True), 12))
    assert len(looped) == 12 and len({f.frame_id for f in looped}) == 12  # ids keep counting across passes
    assert int(looped[5].image[0, 0, 0]) < 10  # the sixth frame is the first one again


def test_unreadable_video_file_raises_instead_of_retrying(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(SourceError, match="broken.mp4"):
        next(iter(VideoSource(str(bad), loop=True)))


# ------------------------------------------------------------------ live sources against a scripted capture


class _Cap:
    """A cv2.VideoCapture stand-in: opens or not, then reads ``n`` frames and fails."""

    def __init__(self, opens: bool, n: int, start: int) -> None:
        self._opens, self._left, self._value = opens, n, start
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return self._opens

    def read(self):
        if self._left <= 0:
            return False, None
        self._left -= 1
        self._value += 1
        return True, np.full((4, 4, 3), self._value, dtype=np.uint8)

    def release(self) -> None:
        self.released = True


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch):
    """Script the captures a live VideoSource opens, and record its backoff waits instead of sleeping."""
    script: list[tuple[bool, int]] = []
    opened: list[_Cap] = []
    waits: list[float] = []

    def fake_open(self):
        opens, n = script.pop(0) if script else (False, 0)
        cap = _Cap(opens, n, start=10 * len(opened))
        opened.append(cap)
        return cap

    def fake_wait(self, seconds: float) -> bool:
        waits.append(seconds)
        if not script:
            self.close()  # script exhausted: end the test's stream
        return not self._stopped()

    monkeypatch.setattr(VideoSource, "_open", fake_open)
    monkeypatch.setattr(VideoSource, "_wait", fake_wait)
    return script, opened, waits


def test_live_source_reconnects_with_exponential_backoff_and_counts(scripted) -> None:
    script, opened, waits = scripted
    # Two failed opens, 3 frames then a drop, one failed open, 2 frames then a drop, end.
    script.extend([(False, 0), (False, 0), (True, 3), (False, 0), (True, 2)])
    source = VideoSource("rtsp://cam/1", options=StreamOptions(initial_backoff_s=0.5, max_backoff_s=30))
    frames = list(source)
    assert [int(f.image[0, 0, 0]) for f in frames] == [21, 22, 23, 41, 42]
    assert [f.frame_id for f in frames] == [f"f{i:09d}" for i in range(1, 6)]
    # Doubling while failing, reset after frames arrived.
    assert waits == [0.5, 1.0, 0.5, 1.0, 0.5]
    assert source.reconnects == 2  # the two opens that followed a failure
    assert source.open_failures == 3
    assert source.drops == 2
    assert all(cap.released for cap in opened)


def test_live_source_backoff_is_capped(scripted) -> None:
    script, _, waits = scripted
    script.extend([(False, 0)] * 7)
    source = VideoSource("http://cam/video", options=StreamOptions(initial_backoff_s=1, max_backoff_s=5))
    assert list(source) == []
    assert waits == [1, 2, 4, 5, 5, 5, 5]
    assert source.reconnects == 0 and source.open_failures == 7


def test_legacy_max_backoff_keyword_still_caps(scripted) -> None:
    script, _, waits = scripted
    script.extend([(False, 0)] * 4)
    list(VideoSource("0", max_backoff=0.2))
    assert waits == [0.2, 0.2, 0.2, 0.2]


def test_close_during_backoff_ends_the_stream() -> None:
    source = VideoSource("http://127.0.0.1:9/never", options=StreamOptions(
        open_timeout_s=0.5, initial_backoff_s=30, max_backoff_s=30))
    reader = FrameReader(source)
    assert reader.get(timeout=0.3) is None  # nothing yet, and the caller was not kept waiting
    reader.close(timeout=10)
    assert not reader._thread.is_alive()  # the 30 s backoff was interrupted
    assert source.open_failures >= 1


def test_external_stop_event_ends_a_live_source(scripted) -> None:
    script, _, _ = scripted
    script.extend([(True, 1000)])
    stop = threading.Event()
    source = VideoSource("rtsp://cam/1", stop=stop)
    taken = []
    for frame in source:
        taken.append(frame)
        if len(taken) == 3:
            stop.set()
    assert len(taken) == 3


def test_credentials_in_stream_urls_stay_out_of_logs() -> None:
    assert sources._redact("rtsp://admin:secret@10.0.0.5:554/s1") == "rtsp://***@10.0.0.5:554/s1"
    assert sources._redact("http://cam/video?x=a@b") == "http://cam/video?x=a@b"
    assert sources._redact(0) == 0


def test_stream_options_are_validated() -> None:
    with pytest.raises(ValueError):
        StreamOptions(read_timeout_s=0)
    with pytest.raises(ValueError):
        StreamOptions(initial_backoff_s=10, max_backoff_s=1)


# ------------------------------------------------------------------ plugins


def _plugin(target, params, *, loop):
    n = int(params.get("n", "2"))
    for i in range(n):
        yield f"{target}-{i}", np.full((8, 8, 3), i, dtype=np.uint8), [(i, 0.5, 0.5, 0.1, 0.1)] if i else None


def test_plugin_scheme_with_target_and_params() -> None:
    source = open_source("fake:cam7?n=3", loop=False, plugins={"fake": _plugin})
    assert isinstance(source, PluginSource)
    frames = list(source)
    assert [f.frame_id for f in frames] == ["cam7-0", "cam7-1", "cam7-2"]
    assert frames[0].labels is None and frames[2].labels == [(2, 0.5, 0.5, 0.1, 0.1)]


def test_plugin_that_yields_junk_is_a_source_error() -> None:
    def junk(target, params, *, loop):
        yield "x", "not an image", None

    with pytest.raises(SourceError, match="non-image"):
        list(open_source("junk:a", plugins={"junk": junk}))
    with pytest.raises(SourceError, match="expected \\(frame_id, image, labels\\)"):
        list(open_source("junk:a", plugins={"junk": lambda t, p, loop: [42]}))


def test_builtin_schemes_win_over_plugins(folder: Path) -> None:
    assert isinstance(open_source(f"folder:{folder}", plugins={"folder": _plugin}), FolderSource)


def test_synthetic_generator_is_an_installed_plugin() -> None:
    assert "synthetic" in discover_plugins()
    frames = list(open_source("synthetic:line_b?seed=3&count=4&imgsz=64", loop=False))
    assert [f.frame_id for f in frames] == [f"line_b-3-{i:07d}" for i in range(4)]
    assert all(f.image.shape == (64, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(f.labels is not None for f in frames)  # labels=1 by default: every frame is corrected
    again = list(open_source("synthetic:line_b?seed=3&count=4&imgsz=64", loop=False))
    assert all(np.array_equal(a.image, b.image) and a.labels == b.labels for a, b in zip(frames, again, strict=True))
    other_seed = next(iter(open_source("synthetic:line_b?seed=4&count=1&imgsz=64")))
    assert not np.array_equal(other_seed.image, frames[0].image)


def test_synthetic_label_share_and_looping() -> None:
    frames = list(itertools.islice(open_source("synthetic:base?labels=0.3&count=200&imgsz=32"), 400))
    assert frames[200].frame_id == frames[0].frame_id  # count=200 with loop: starts over
    labelled = sum(f.labels is not None for f in frames[:200])
    assert 35 <= labelled <= 85  # ~30 % of frames carry their correction
    assert [f.labels is None for f in frames[:200]] == [f.labels is None for f in frames[200:]]
    assert all(f.labels is None for f in open_source("synthetic:base?labels=0&count=20&imgsz=32", loop=False))


@pytest.mark.parametrize(("spec", "message"), [
    ("synthetic:nope", "unknown scenario 'nope'"),
    ("synthetic:base?sed=1", "unknown parameter"),
    ("synthetic:base?seed=x", "seed='x' is not an integer"),
    ("synthetic:base?labels=2", "labels must be in"),
    ("synthetic:base?imgsz=8", "imgsz must be at least 32"),
])
def test_synthetic_bad_spec_fails_before_any_frame(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        next(iter(open_source(spec)))


# ------------------------------------------------------------------ the threaded reader


def test_reader_hands_over_every_frame_in_order_then_ends(folder: Path) -> None:
    reader = FrameReader(FolderSource(folder, loop=False))
    got = wait_for_frames(reader, 10, timeout=10)
    assert [f.frame_id for f in got] == ["a", "b", "c"]
    with pytest.raises(SourceEnded):
        reader.get(timeout=1)
    with pytest.raises(SourceEnded):  # and stays ended
        reader.get(timeout=1)
    reader.close()


def test_reader_returns_none_when_no_frame_arrives_in_time() -> None:
    release = threading.Event()

    def slow():
        release.wait(10)
        yield Frame("late", np.zeros((2, 2, 3), np.uint8))

    with FrameReader(slow()) as reader:
        assert reader.get(timeout=0.05) is None
        release.set()
        assert wait_for_frames(reader, 1, timeout=10)[0].frame_id == "late"


def test_reader_raises_the_source_error_in_the_consumer(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with FrameReader(FolderSource(tmp_path, loop=True)) as reader, pytest.raises(SourceError, match="no readable"):
        reader.get(timeout=10)


def test_latest_only_reader_drops_stale_frames() -> None:
    produced = threading.Event()

    def fast():
        for i in range(50):
            yield Frame(str(i), np.zeros((2, 2, 3), np.uint8))
        produced.set()

    reader = FrameReader(fast(), latest_only=True)
    assert produced.wait(10)
    frame = reader.get(timeout=5)
    assert frame.frame_id == "49"  # the newest, not the oldest
    assert reader.stale_dropped == 49
    reader.close()
