"""Frame sources: the folder source with sibling YOLO labels, and the label reader."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.sources import FolderSource, Frame, SourceError, VideoSource, open_source, read_yolo_labels


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


def test_open_source(folder: Path) -> None:
    assert isinstance(open_source(f"folder:{folder}", loop=False), FolderSource)
    assert isinstance(open_source("rtsp://camera/stream"), VideoSource)
    with pytest.raises(SourceError, match="no frame source"):
        open_source("")
