"""Hostile image archives: bombs, traversal, links, member floods, oversized images.

Nothing is ever extracted by name, so a traversal or link could only do harm through a bug; the
tests still check that no file appears outside the test's folder and that the work stays bounded.
"""

from __future__ import annotations

import io
import struct
import tarfile
import time
import zipfile
import zlib

import numpy as np
import pytest

from recalib.errors import ArchiveRejectedError
from tests.worker.formats_files import digit_pngs
from worker.digits import load_digits_arrays
from worker.formats.data import DataLimits, open_samples


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return digit_pngs(load_digits_arrays()[0], 4)


def _zip(path, members, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name) if name.startswith("/") else name, data)
    return path


def _tar_add(archive: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    archive.addfile(info, io.BytesIO(data) if data else None)


def test_zip_bomb_member_is_rejected_before_inflating(pngs, tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("a/ok.png", pngs[0])
        with archive.open("a/bomb.png", "w") as member:
            for _ in range(32):
                member.write(bytes(1 << 20))  # 32 MiB of zeros, ~32 KiB deflated
    assert path.stat().st_size < 200_000
    with pytest.raises(
        ArchiveRejectedError,
        match=r"bomb\.zip: member 'a/bomb\.png' expands to 33554432 bytes, over 200×",
    ):
        open_samples(path)


def test_declared_bytes_over_the_limit_are_rejected(pngs, tmp_path):
    path = _zip(tmp_path / "big.zip", {f"{i}.png": pngs[i] for i in range(4)}, zipfile.ZIP_STORED)
    limits = DataLimits(max_archive_bytes=sum(map(len, pngs[:3])))
    with pytest.raises(
        ArchiveRejectedError, match=r"uncompressed bytes .*RECALIB_MAX_ARCHIVE_BYTES"
    ):
        open_samples(path, limits=limits)


def test_tgz_expanding_too_far_is_rejected(pngs, tmp_path):
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        _tar_add(archive, "x/ok.png", pngs[0])
        _tar_add(archive, "x/zeros.bin", bytes(80 << 20))  # 80 MiB → ~80 KiB gzipped
    with pytest.raises(ArchiveRejectedError, match=r"the archive expands to \d+ bytes, over 200×"):
        open_samples(path)


def test_member_larger_than_declared_is_rejected(pngs, tmp_path):
    path = _zip(tmp_path / "lie.zip", {"a.png": pngs[0], "b.png": pngs[1]}, zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    true_size = len(pngs[0])
    # Shrink a.png's declared size (local header and central directory) to 10 bytes.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        assert struct.unpack("<I", data[at + offset : at + offset + 4])[0] == true_size
        data[at + offset : at + offset + 4] = struct.pack("<I", 10)
    path.write_bytes(bytes(data))
    samples = open_samples(path)  # never reads past the declared 10 bytes: a.png is corrupt
    assert samples.num_samples == 1 and samples.skipped_examples[0].startswith("a.png: corrupt")


@pytest.mark.parametrize(
    "name", ["../escape.png", "cls/../../escape.png", "/abs/escape.png", "C:\\escape.png"]
)
def test_traversal_and_absolute_names_reject_zip(name, pngs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    path = _zip(work / "t.zip", {"cls/ok.png": pngs[0], name: pngs[1]})
    with pytest.raises(ArchiveRejectedError, match=r"absolute or parent-relative path.*traversal"):
        open_samples(path, work_dir=work)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["t.zip", "work"]


@pytest.mark.parametrize("name", ["../escape.png", "/tmp/escape.png"])
def test_traversal_and_absolute_names_reject_tar(name, pngs, tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as archive:
        _tar_add(archive, "cls/ok.png", pngs[0])
        _tar_add(archive, name, pngs[1])
    with pytest.raises(ArchiveRejectedError, match=r"t\.tar: member .* \(path traversal\)"):
        open_samples(path)


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_links_and_devices_in_tar_are_skipped_never_followed(mode, pngs, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(pngs[3])
    path = tmp_path / ("links.tar" + (".gz" if mode.endswith("gz") else ""))
    with tarfile.open(path, mode) as archive:
        for i in range(2):
            _tar_add(archive, f"cls/{i}.png", pngs[i])
        _tar_add(archive, "cls/sym.png", type=tarfile.SYMTYPE, linkname=str(secret))
        _tar_add(archive, "cls/hard.png", type=tarfile.LNKTYPE, linkname="cls/0.png")
        _tar_add(archive, "cls/dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _tar_add(archive, "cls/fifo.png", type=tarfile.FIFOTYPE)
    before = sorted(tmp_path.rglob("*"))
    samples = open_samples(path, work_dir=tmp_path)
    assert samples.num_samples == 2 and samples.skipped_entries == 4
    assert sorted(samples.skipped_examples) == [
        "cls/dev.png: not a regular file",
        "cls/fifo.png: not a regular file",
        "cls/hard.png: link, not followed",
        "cls/sym.png: link, not followed",
    ]
    assert sorted(tmp_path.rglob("*")) == before  # nothing extracted, spool file anonymous


def test_symlink_member_in_zip_is_skipped(pngs, tmp_path):
    path = tmp_path / "links.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ok.png", pngs[0])
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK
        archive.writestr(link, "/etc/passwd")
    samples = open_samples(path)
    assert samples.num_samples == 1 and samples.skipped_examples == ["link.png: link, not followed"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_ten_thousand_tiny_members(kind, pngs, tmp_path):
    path = tmp_path / f"flood.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("a.png", pngs[0])
            for i in range(10_000):
                archive.writestr(f"junk/{i}.txt", b"")
    else:
        with tarfile.open(path, "w") as archive:
            _tar_add(archive, "a.png", pngs[0])
            for i in range(10_000):
                _tar_add(archive, f"junk/{i}.txt")
    start = time.perf_counter()
    with pytest.raises(ArchiveRejectedError, match=r"more than 1000 members .*MAX_ARCHIVE_MEMBERS"):
        open_samples(path, limits=DataLimits(max_archive_members=1000))
    rejected_s = time.perf_counter() - start
    start = time.perf_counter()
    samples = open_samples(path)  # within the default limit: opens, junk counted
    opened_s = time.perf_counter() - start
    assert samples.num_samples == 1 and samples.skipped_entries == 10_000
    assert len(samples.skipped_examples) == 20
    assert rejected_s < 1.0 and opened_s < 5.0, (rejected_s, opened_s)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height (a decompression bomb needs no more to be one)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bombs_are_skipped_before_decoding(pngs, tmp_path):
    members = {
        "ok.png": pngs[0],
        "huge.png": _png_header_only(100_000, 100_000),
        "big.png": _png_header_only(300, 300),
    }
    path = _zip(tmp_path / "pixels.zip", members)
    samples = open_samples(path, limits=DataLimits(max_image_pixels=50_000))
    assert samples.num_samples == 1
    reasons = dict(example.split(": ", 1) for example in samples.skipped_examples)
    assert reasons["big.png"] == "300×300 pixels, over max_image_pixels"
    assert "huge.png" in reasons and (
        "decompression-bomb" in reasons["huge.png"]
        or "over max_image_pixels" in reasons["huge.png"]
    )
    image, _ = samples[0]
    assert image.shape == (3, 8, 8) and np.isfinite(image.numpy()).all()
