"""Bounds that a data file's own claims must not get around: a zip's member count, an .npz
member's declared array size, the size of an image after ``preprocess.resize``, and the cause a
preflight failure reports. Every file here is real and small; nothing is mocked."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recalib.contract import JobOptions, Preprocess
from recalib.errors import ArchiveRejectedError, InvalidDataError, InvalidOptionError
from tests.worker.formats_files import digit_pngs, png_bytes
from worker.batch_limits import BatchLimits
from worker.digits import load_digits_arrays
from worker.engine.inputs import call_model
from worker.formats.data import DataLimits, open_samples
from worker.formats.models import LoadedModel
from worker.preflight import check_job
from worker.splits import plan_data


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


_INPUTS_MEMBER_BYTES = 512 * 1024**2


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    text = repr(header).encode("latin1")
    padding = 64 - (10 + len(text) + 1) % 64
    text += b" " * padding + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _npz_with_inflating_inputs(path: Path) -> Path:
    """``inputs.npy``: N×1×8×8 float32 zeros, 512 MiB inflated, about 0.5 MiB deflated; written
    a MiB at a time so the test itself never holds the array."""
    rows = _INPUTS_MEMBER_BYTES // (8 * 8 * 4)
    chunk = bytes(1024**2)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("inputs.npy", "w", force_zip64=True) as member,
    ):
        member.write(_npy_header((rows, 1, 8, 8)))
        for _ in range(_INPUTS_MEMBER_BYTES // len(chunk)):
            member.write(chunk)
    return path


def test_an_npz_member_inflating_to_512_mib_is_refused_before_it_is_read(tmp_path):
    path = _npz_with_inflating_inputs(tmp_path / "bomb.npz")
    assert path.stat().st_size < 1024**2
    start = time.perf_counter()
    with pytest.raises(InvalidDataError, match=r"bomb\.npz: inputs\.npy declares 536870912 bytes"):
        open_samples(path)
    assert time.perf_counter() - start < 2.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
def test_refusing_the_inflating_npz_keeps_resident_memory_flat(tmp_path):
    # VmHWM, not ru_maxrss: a child inherits its parent's ru_maxrss across fork and exec.
    path = _npz_with_inflating_inputs(tmp_path / "bomb.npz")
    script = textwrap.dedent(
        f"""
        import re
        from recalib.errors import InvalidDataError
        from worker.formats.data import open_samples

        def peak_kib():
            with open("/proc/self/status") as status:
                return int(re.search(r"VmHWM:\\s+(\\d+)", status.read()).group(1))

        before = peak_kib()
        try:
            open_samples({str(path)!r})
        except InvalidDataError:
            pass
        print(peak_kib() - before)
        """
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True
    )
    grown_kib = int(done.stdout.strip().splitlines()[-1])
    assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB"


def test_npz_arrays_over_max_archive_bytes_are_refused_naming_the_limit(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, inputs=np.ones((4096, 1, 8, 8), dtype=np.float32))  # 1 MiB, stored
    with pytest.raises(
        InvalidDataError, match=r"big\.npz: inputs\.npy declares 1048576 bytes"
    ) as info:
        open_samples(path, limits=DataLimits(max_archive_bytes=512 * 1024))
    assert info.value.type_slug == "invalid-data"
    assert "524288" in info.value.message and "RECALIB_MAX_ARCHIVE_BYTES" in info.value.message


def test_an_npz_declaring_a_trillion_samples_is_invalid_data_not_a_memory_error(tmp_path):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("inputs.npy", _npy_header((10**12, 1, 8, 8)) + bytes(256))
        archive.writestr("labels.npy", _npy_header((1,), "<i8") + bytes(8))
    start = time.perf_counter()
    with pytest.raises(InvalidDataError, match=r"huge\.npz: inputs\.npy declares") as info:
        open_samples(path)
    assert info.value.type_slug == "invalid-data" and info.value.file == str(path)
    assert time.perf_counter() - start < 2.0


def test_an_npz_with_an_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "objects.npz"
    inputs = np.empty(2, dtype=object)
    inputs[:] = [np.zeros((1, 8, 8)), np.zeros((1, 8, 8))]
    np.savez(path, inputs=inputs)
    with pytest.raises(InvalidDataError, match=r"objects\.npz holds object arrays"):
        open_samples(path)


def test_a_valid_npz_still_opens(tmp_path):
    path = tmp_path / "ok.npz"
    inputs = np.asfortranarray(np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32))
    np.savez_compressed(path, inputs=inputs, labels=np.arange(6), extra=np.zeros(3))
    samples = open_samples(path)
    assert samples.num_samples == 6 and samples.sample_shape == (1, 8, 8)
    batch, labels = samples.get_batch([0, 5])
    assert torch.equal(batch, torch.from_numpy(inputs[[0, 5]]))
    assert labels.tolist() == [0, 5]


def _zip_pngs(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_a_resize_past_max_image_pixels_is_an_invalid_option(pngs, tmp_path):
    path = _zip_pngs(tmp_path / "tiny.zip", {f"{i}.png": p for i, p in enumerate(pngs)})
    with pytest.raises(InvalidOptionError, match=r"preprocess\.resize 8192") as info:
        open_samples(path, preprocess=Preprocess(resize=8192))
    assert info.value.field == "options.preprocess.resize"
    assert "max_image_pixels" in info.value.message and "50000000" in info.value.message


def test_an_image_that_a_resize_makes_too_large_is_skipped(tmp_path):
    square = png_bytes(np.zeros((8, 8), dtype=np.uint8))
    tall = png_bytes(np.zeros((80, 8), dtype=np.uint8))  # 64 → 64×640 pixels after the resize
    path = _zip_pngs(tmp_path / "mixed.zip", {"a.png": square, "b.png": tall})
    samples = open_samples(
        path,
        preprocess=Preprocess(mode="L", resize=64, center_crop=64),
        limits=DataLimits(max_image_pixels=10_000),
    )
    assert samples.num_samples == 1 and samples.sample_shape == (1, 64, 64)
    assert samples.skipped_entries == 1
    assert "b.png" in samples.skipped_examples[0]
    assert "max_image_pixels" in samples.skipped_examples[0]


class _FailingNet(nn.Module):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.message = message

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bn(x)
        raise RuntimeError(self.message)


def _check_failing_model(message: str, tmp_path: Path) -> InvalidDataError:
    data = tmp_path / "data.npz"
    np.savez(data, inputs=np.zeros((4, 1, 8, 8), dtype=np.float32), labels=np.zeros(4, int))
    samples = open_samples(data)
    model = _FailingNet(message).eval()
    loaded = LoadedModel(module=model, format="module", source_path=tmp_path / "model.pt")
    options = JobOptions()
    plan = plan_data(samples, None, options)
    with pytest.raises(InvalidDataError) as info:
        check_job(model, loaded, plan, BatchLimits(), options, call_model)
    return info.value


def test_preflight_keeps_every_line_of_the_models_failure(tmp_path):
    error = _check_failing_model(
        "shapes cannot be multiplied\n  in layer fc: expects 64 features, got 256", tmp_path
    )
    assert "samples of shape (1, 8, 8) from data.npz" in error.message
    assert "expects 64 features, got 256" in error.message


def test_preflight_bounds_the_length_of_the_cause(tmp_path):
    error = _check_failing_model("why it failed " + "x" * 10_000, tmp_path)
    assert "why it failed" in error.message
    assert len(error.message) < 2_300


def test_preflight_names_a_failure_that_has_no_message(tmp_path):
    error = _check_failing_model("", tmp_path)
    assert error.message.endswith("from data.npz: RuntimeError")
