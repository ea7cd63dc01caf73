"""Hostile or broken archives: truncation, traversal, links, devices, extras, wrong formats."""

from __future__ import annotations

import gzip
import io
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from firmware_bundles import (
    BundleError,
    BundleNotFound,
    FileMismatch,
    FileMissing,
    ManifestMissing,
    NotATarArchive,
    SignatureMissing,
    TruncatedBundle,
    UnexpectedMember,
    UnsafeMember,
    build_bundle,
    generate_private_key,
    verify_bundle,
)
from firmware_bundles.reader import BundleReader

MODEL_BYTES = b"\x01\x02model" * 700


@pytest.fixture()
def key():
    return generate_private_key()


@pytest.fixture()
def bundle(tmp_path, key) -> Path:
    (tmp_path / "model.onnx").write_bytes(MODEL_BYTES)
    out = tmp_path / "bundle.tar"
    build_bundle(
        out,
        {"model.onnx": tmp_path / "model.onnx"},
        private_key=key,
        model_name="detector",
        version=1,
        class_names=["a"],
        input_spec=64,
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    return out


def _copy_with(
    src: Path,
    dst: Path,
    *,
    extra: list[tuple[tarfile.TarInfo, bytes | None]] = (),
    drop: tuple[str, ...] = (),
    first: bool = False,
) -> Path:
    """Rebuild ``src`` by hand, dropping members and adding hostile ones (first or last)."""
    with tarfile.open(src) as old, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as new:
        kept = [(i, old.extractfile(i).read()) for i in old.getmembers() if i.name not in drop]
        ordered = [*extra, *kept] if first else [*kept, *extra]
        for info, data in ordered:
            new.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def _regular(name: str, data: bytes = b"evil") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _cut_points(path: Path) -> list[int]:
    """Offsets inside every header, at every data boundary, and inside the end marker."""
    with tarfile.open(path) as tar:
        infos = tar.getmembers()
        end = tar.offset
    points = {1, 100, 511}
    for info in infos:
        points |= {info.offset, info.offset + 256, info.offset_data, info.offset_data + 1}
        points |= {info.offset_data + info.size - 1, info.offset_data + info.size}
    points |= {end, end + 1, end + 512, end + 1023}
    return sorted(p for p in points if 0 < p < path.stat().st_size)


def test_truncated_archive_is_detected_at_every_cut(tmp_path, key, bundle) -> None:
    data = bundle.read_bytes()
    cuts = _cut_points(bundle)
    assert len(cuts) > 20
    with tarfile.open(bundle) as tar:
        data_ranges = [(i.name, i.offset_data, i.offset_data + i.size) for i in tar.getmembers()]
    for cut in cuts:
        short = tmp_path / f"cut-{cut}.tar"
        short.write_bytes(data[:cut])
        with pytest.raises(TruncatedBundle) as info:
            verify_bundle(short, key.public_key())
        # A cut inside a member's data names that member.
        for name, start, stop in data_ranges:
            if start <= cut < stop:
                assert f"data of {name!r} is cut short" in str(info.value)


def test_padding_after_end_marker_is_not_required(tmp_path, key, bundle) -> None:
    # Cutting the record padding (after the two zero blocks) leaves a complete tar.
    with tarfile.open(bundle) as tar:
        tar.getmembers()  # offset is only past the last member once all are read
        end = tar.offset
    short = tmp_path / "short.tar"
    short.write_bytes(bundle.read_bytes()[: end + 1024])
    assert verify_bundle(short, key.public_key()).version == 1


def test_empty_file_is_not_a_tar(tmp_path, key) -> None:
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(NotATarArchive):
        verify_bundle(tmp_path / "empty.tar", key.public_key())


def test_garbage_and_compressed_archives_are_refused(tmp_path, key, bundle) -> None:
    (tmp_path / "junk.tar").write_bytes(b"PK\x03\x04" + b"x" * 2000)
    with pytest.raises(NotATarArchive, match="not an uncompressed tar"):
        verify_bundle(tmp_path / "junk.tar", key.public_key())
    (tmp_path / "b.tar.gz").write_bytes(gzip.compress(bundle.read_bytes()))
    with pytest.raises(NotATarArchive):
        verify_bundle(tmp_path / "b.tar.gz", key.public_key())


def test_missing_path_and_directory(tmp_path, key) -> None:
    with pytest.raises(BundleNotFound, match="not found"):
        verify_bundle(tmp_path / "nope.tar", key.public_key())
    with pytest.raises(BundleNotFound, match="not a regular file"):
        verify_bundle(tmp_path, key.public_key())


def test_extra_member_is_refused(tmp_path, key, bundle) -> None:
    evil = _copy_with(bundle, tmp_path / "evil.tar", extra=[_regular("files/backdoor.so")])
    with pytest.raises(UnexpectedMember, match="files/backdoor.so"):
        verify_bundle(evil, key.public_key())
    evil = _copy_with(bundle, tmp_path / "evil2.tar", extra=[_regular("README")])
    with pytest.raises(UnexpectedMember, match="outside files/"):
        verify_bundle(evil, key.public_key())


def test_directory_members_are_tolerated(tmp_path, key, bundle) -> None:
    folder = tarfile.TarInfo("files")
    folder.type = tarfile.DIRTYPE
    ok = _copy_with(bundle, tmp_path / "dirs.tar", extra=[(folder, None)], first=True)
    assert verify_bundle(ok, key.public_key()).version == 1


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_regular("../evil"), "'..' component"),
        (_regular("files/../../evil"), "'..' component"),
        (_regular("/etc/cron.d/evil"), "absolute"),
        (_special("files/link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (_special("files/model.onnx.lnk", tarfile.LNKTYPE, "manifest.json"), "hard link"),
        (_special("files/dev", tarfile.CHRTYPE), "device node"),
        (_special("files/blk", tarfile.BLKTYPE), "device node"),
        (_special("files/pipe", tarfile.FIFOTYPE), "FIFO"),
        (_special("files/cont", tarfile.CONTTYPE), "unsupported type"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink",
        "hardlink",
        "chardev",
        "blockdev",
        "fifo",
        "contig",
    ],
)
@pytest.mark.parametrize("first", [True, False], ids=["first", "last"])
def test_unsafe_members_are_refused(tmp_path, key, bundle, member, reason: str, first: bool) -> None:
    evil = _copy_with(bundle, tmp_path / "evil.tar", extra=[member], first=first)
    with pytest.raises(UnsafeMember, match=reason):
        verify_bundle(evil, key.public_key())


def test_duplicate_member_is_refused(tmp_path, key, bundle) -> None:
    evil = _copy_with(bundle, tmp_path / "evil.tar", extra=[_regular("files/model.onnx", MODEL_BYTES)])
    with pytest.raises(UnsafeMember, match="appears twice"):
        verify_bundle(evil, key.public_key())


def test_data_after_end_marker_is_refused(tmp_path, key, bundle) -> None:
    evil = tmp_path / "evil.tar"
    evil.write_bytes(bundle.read_bytes() + bundle.read_bytes())
    with pytest.raises(UnexpectedMember, match="after its end-of-archive marker"):
        verify_bundle(evil, key.public_key())


def test_missing_members(tmp_path, key, bundle) -> None:
    cases = [
        ("files/model.onnx", FileMissing),
        ("manifest.sig", SignatureMissing),
        ("manifest.json", ManifestMissing),
    ]
    for name, error in cases:
        broken = _copy_with(bundle, tmp_path / "broken.tar", drop=(name,))
        with pytest.raises(error):
            verify_bundle(broken, key.public_key())


def test_reader_rehashes_streamed_files(bundle) -> None:
    # The extraction path hashes again, so content that differs from the manifest never passes silently.
    with BundleReader(bundle) as reader:
        manifest, _ = reader.read_manifest()
        entry = manifest.files[0].model_copy(update={"sha256": "0" * 64})
        with pytest.raises(FileMismatch):
            list(reader.iter_file(entry))
        assert b"".join(reader.iter_file(manifest.files[0])) == MODEL_BYTES


def test_all_errors_share_the_base_class() -> None:
    for error in (TruncatedBundle, UnsafeMember, UnexpectedMember, NotATarArchive, BundleNotFound):
        assert issubclass(error, BundleError)
