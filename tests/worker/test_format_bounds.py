"""Bounds that a data file's own claims must not get around: a zip's member count, an .npz
member's declared array size, the size of an image after ``preprocess.resize``, and the cause a
preflight failure reports. Every file here is real and small; nothing is mocked."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest

from recalib.errors import ArchiveRejectedError
from tests.worker.formats_files import digit_pngs
from worker.digits import load_digits_arrays
from worker.formats.data import DataLimits, open_samples


def _lie_about_the_count(path: Path, count: int) -> None:
    """Rewrite the end-of-central-directory record's two entry counts to ``count``."""
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 8 : end + 12] = struct.pack("<HH", count, count)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return digit_pngs(load_digits_arrays()[0], 4)


def test_a_zip_whose_end_record_understates_its_members_is_rejected(pngs, tmp_path):
    path = tmp_path / "lying.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(3000):
            archive.writestr(f"digits/{i}.png", pngs[i % len(pngs)])
    _lie_about_the_count(path, 10)
    with pytest.raises(ArchiveRejectedError, match=r"lying\.zip: more than 2000 members") as info:
        open_samples(path, limits=DataLimits(max_archive_members=2000))
    assert "RECALIB_MAX_ARCHIVE_MEMBERS" in info.value.message
    assert info.value.file == str(path)


def test_a_zip_whose_end_record_overstates_its_members_still_opens(pngs, tmp_path):
    path = tmp_path / "modest.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(30):
            archive.writestr(f"digits/{i}.png", pngs[i % len(pngs)])
    _lie_about_the_count(path, 5000)  # the directory itself decides, as it does for zipfile
    samples = open_samples(path, limits=DataLimits(max_archive_members=2000))
    assert samples.num_samples == 30
