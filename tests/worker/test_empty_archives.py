"""An empty ``.npz`` (no arrays) is reported as such, not as an image archive without images."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from recalib.errors import InvalidDataError
from worker.formats.data import open_samples


def test_an_empty_npz_says_it_has_no_arrays(tmp_path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path)  # a valid zip with no member at all
    with pytest.raises(InvalidDataError) as caught:
        open_samples(path)
    message = str(caught.value)
    assert "calib.npz" in message and "empty .npz" in message and "no arrays" in message
    assert "image" not in message
    assert caught.value.file == str(path)


def test_an_empty_zip_says_it_is_empty(tmp_path) -> None:
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w"):
        pass
    expected = r"images\.zip: the zip archive is empty: no arrays and no images"
    with pytest.raises(InvalidDataError, match=expected):
        open_samples(path)
