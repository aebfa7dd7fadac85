"""worker.formats.images: image archives from real digits, layouts, preprocessing, skipping."""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from recalib.contract import Preprocess
from recalib.errors import InvalidDataError
from tests.worker.formats_files import digit_pngs, png_bytes
from worker.digits import load_digits_arrays
from worker.formats.data import make_loader, open_samples

GRAY = Preprocess(mode="L")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits_arrays()
    return x[:60], y[:60]


def _class_members(digits) -> dict[str, bytes]:
    x, y = digits
    return {
        f"set/{label}/img{i:03d}.png": png
        for i, (png, label) in enumerate(zip(digit_pngs(x, len(x)), y, strict=True))
    }


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _tar(path, members: dict[str, bytes], mode: str = "w"):
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("suffix", ["zip", "tar", "tar.gz"])
def test_class_folders_give_imagefolder_labels(suffix, digits, tmp_path):
    members = _class_members(digits)
    path = tmp_path / f"digits.{suffix}"
    _zip(path, members) if suffix == "zip" else _tar(
        path, members, "w:gz" if suffix.endswith("gz") else "w"
    )
    samples = open_samples(path, preprocess=GRAY)
    x, y = digits
    assert samples.has_labels and samples.num_samples == 60 and samples.sample_shape == (1, 8, 8)
    assert samples.class_names == sorted({str(label) for label in y})
    # Samples are ordered by (class, file name); labels are class indices (digit names sort 0..9).
    order = sorted(range(60), key=lambda i: (str(y[i]), f"img{i:03d}"))
    assert samples.labels().tolist() == [int(y[i]) for i in order]
    inputs, labels = next(iter(make_loader(samples, indices=list(range(10)), batch_size=10)))
    expected = torch.from_numpy(np.round(x[order[:10]] * 255) / 255).float()
    torch.testing.assert_close(inputs, expected, atol=1e-6, rtol=0)
    assert labels.tolist() == [int(y[i]) for i in order[:10]]


def test_flat_archive_is_unlabeled(digits, tmp_path):
    pngs = digit_pngs(digits[0], 12)
    path = _zip(tmp_path / "flat.zip", {f"{i}.png": p for i, p in enumerate(pngs)})
    samples = open_samples(path)
    assert not samples.has_labels and samples.labels() is None and samples.num_samples == 12
    image, label = samples[3]
    assert label == -1 and image.shape == (3, 8, 8)  # default mode RGB
    assert torch.equal(image[0], image[2])


def test_single_top_folder_is_a_wrapper_not_a_class(digits, tmp_path):
    pngs = digit_pngs(digits[0], 4)
    samples = open_samples(
        _zip(tmp_path / "w.zip", {f"photos/{i}.png": p for i, p in enumerate(pngs)})
    )
    assert not samples.has_labels


def test_preprocessing_resize_crop_normalize(tmp_path):
    rng = np.random.default_rng(0)
    members = {
        "a/wide.png": png_bytes(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)),
        "b/tall.png": png_bytes(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)),
    }
    path = _zip(tmp_path / "sizes.zip", members)
    with pytest.raises(
        InvalidDataError, match=r"images differ in size after preprocessing .*center_crop"
    ):
        open_samples(path)
    preprocess = Preprocess(resize=20, center_crop=16, mean=[0.5], std=[0.25])
    samples = open_samples(path, preprocess=preprocess)
    assert samples.sample_shape == (3, 16, 16)
    batch, labels = next(iter(make_loader(samples, indices=None, batch_size=2)))
    assert batch.shape == (2, 3, 16, 16) and labels.tolist() == [0, 1]
    raw = Image.open(io.BytesIO(members["a/wide.png"])).resize((30, 20), Image.Resampling.BILINEAR)
    crop = np.asarray(raw.crop((7, 2, 23, 18)), dtype=np.float32) / 255
    expected = (torch.from_numpy(crop).permute(2, 0, 1) - 0.5) / 0.25
    torch.testing.assert_close(batch[0], expected)


def test_crop_larger_than_image_skips_it(digits, tmp_path):
    members = {
        "small.png": digit_pngs(digits[0], 1)[0],
        "big.png": png_bytes(np.zeros((20, 20), np.uint8)),
    }
    samples = open_samples(_zip(tmp_path / "c.zip", members), preprocess=Preprocess(center_crop=16))
    assert samples.num_samples == 1 and samples.skipped_entries == 1
    assert (
        "small.png" in samples.skipped_examples[0] and "center_crop" in samples.skipped_examples[0]
    )


def test_non_images_and_corrupt_images_are_skipped_and_counted(digits, tmp_path):
    members = _class_members(digits)
    good = next(iter(members.values()))
    members.update(
        {
            "set/README.txt": b"hello",
            "set/3/notes.csv": b"a,b",
            "set/3/garbage.png": b"\x89PNG not really",
            "set/4/truncated.png": good[: len(good) // 2],
            "set/5/.DS_Store": b"\0\0",
            "__MACOSX/set/5/._img.png": b"\0",
        }
    )
    samples = open_samples(_zip(tmp_path / "mixed.zip", members))
    assert samples.num_samples == 60 and samples.skipped_entries == 6
    reasons = dict(example.split(": ", 1) for example in samples.skipped_examples)
    assert reasons["set/README.txt"] == "not an image (extension)"
    assert reasons["set/3/garbage.png"].startswith("corrupt")
    assert reasons["set/4/truncated.png"].startswith("corrupt")
    assert reasons["set/5/.DS_Store"] == "hidden or metadata file"


def test_skipped_examples_are_capped_at_20(digits, tmp_path):
    members = {f"f{i}.txt": b"x" for i in range(50)} | {"a.png": digit_pngs(digits[0], 1)[0]}
    samples = open_samples(_zip(tmp_path / "many.zip", members))
    assert samples.skipped_entries == 50 and len(samples.skipped_examples) == 20


def test_archive_without_images_and_mixed_depths(digits, tmp_path):
    with pytest.raises(InvalidDataError, match=r"none\.zip: no usable images \(skipped 2 entries"):
        open_samples(_zip(tmp_path / "none.zip", {"a.txt": b"1", "b.txt": b"2"}))
    png = digit_pngs(digits[0], 1)[0]
    mixed = {"top.png": png, "cls/a.png": png, "cls/deeper/b.png": png}
    with pytest.raises(
        InvalidDataError, match=r"in <class>/<image> folders; found them \[1, 2, 3\]"
    ):
        open_samples(_zip(tmp_path / "mixed.zip", mixed))


def test_images_decode_in_worker_processes(digits, tmp_path):
    members = _class_members(digits)
    writers = (("zip", _zip), ("tar", _tar), ("tar.gz", lambda p, m: _tar(p, m, "w:gz")))
    for suffix, write in writers:
        samples = open_samples(write(tmp_path / f"d.{suffix}", members), preprocess=GRAY)
        single = torch.cat([b[0] for b in make_loader(samples, indices=None, batch_size=16)])
        multi = torch.cat(
            [b[0] for b in make_loader(samples, indices=None, batch_size=16, num_workers=2)]
        )
        assert torch.equal(single, multi)
