"""worker.formats.data/tensors: .npz/.safetensors/.pt data files, their errors, the loader."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch

from recalib.errors import InvalidDataError
from tests.worker.formats_files import digits_arrays
from worker.digits import DigitsNet
from worker.formats.data import check_labels, make_loader, open_samples


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_arrays()
    return x[:200], y[:200]


def _write(kind: str, path, **arrays) -> None:
    if kind == "npz":
        np.savez(path, **arrays)
    elif kind == "safetensors":
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        safetensors.torch.save_file(tensors, str(path))
    else:
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, path)


@pytest.mark.parametrize("kind", ["npz", "safetensors", "pt"])
def test_tensor_files_open_with_labels(kind, digits, tmp_path):
    x, y = digits
    path = tmp_path / f"data.{kind}"
    _write(kind, path, inputs=x, labels=y, extra=np.zeros(3))
    samples = open_samples(path)
    assert (samples.num_samples, samples.sample_shape, samples.has_labels) == (200, (1, 8, 8), True)
    assert samples.skipped_entries == 0
    inputs, label = samples[7]
    assert inputs.dtype == torch.float32 and label == int(y[7])
    torch.testing.assert_close(inputs, torch.from_numpy(x[7]))
    assert torch.equal(samples.labels(), torch.from_numpy(y))


def test_unlabeled_file_gives_minus_one_and_float64_becomes_float32(digits, tmp_path):
    x, _ = digits
    np.savez(tmp_path / "u.npz", inputs=x.astype(np.float64))
    samples = open_samples(tmp_path / "u.npz")
    assert not samples.has_labels and samples.labels() is None
    inputs, label = samples[0]
    assert label == -1 and inputs.dtype == torch.float32


def test_loader_follows_index_order_in_batches(digits, tmp_path):
    x, y = digits
    np.savez(tmp_path / "d.npz", inputs=x, labels=y)
    samples = open_samples(tmp_path / "d.npz")
    order = [5, 3, 190, 0, 42, 7, 8]
    batches = list(make_loader(samples, indices=order, batch_size=3))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    labels = torch.cat([b[1] for b in batches])
    assert labels.dtype == torch.int64 and labels.tolist() == [int(y[i]) for i in order]
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), torch.from_numpy(x[order]))
    assert sum(len(b[0]) for b in make_loader(samples, indices=None, batch_size=64)) == 200


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"data": np.zeros((4, 2), np.float32)}, r"has no 'inputs' array \(found: \['data'\]\)"),
        ({"inputs": np.zeros(4, np.float32)}, r"at least 2 dimensions\), got shape \(4,\)"),
        ({"inputs": np.zeros((0, 3), np.float32)}, "inputs hold zero samples"),
        ({"inputs": np.zeros((4, 3), np.uint8)}, "inputs are uint8, not floating point"),
        ({"inputs": np.zeros((4, 3), np.int64)}, "inputs are int64, not floating point"),
        (
            {"inputs": np.zeros((4, 3), np.float32), "labels": np.zeros(4, np.float32)},
            "labels must be integers",
        ),
        (
            {"inputs": np.zeros((4, 3), np.float32), "labels": np.zeros(3, np.int64)},
            r"one integer per sample, shape \(4,\); got \(3,\)",
        ),
        (
            {"inputs": np.zeros((4, 3), np.float32), "labels": np.array([0, 1, -2, 0])},
            "sample 2 has label -2",
        ),
    ],
)
def test_bad_arrays_are_named(arrays, message, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InvalidDataError, match=message) as info:
        open_samples(path)
    assert str(info.value).startswith("bad.npz") and info.value.file == str(path)


@pytest.mark.parametrize("kind", ["npz", "safetensors", "pt"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_name_the_first_sample(kind, bad, digits, tmp_path):
    x = digits[0].copy()
    x[123, 0, 4, 4] = bad
    x[150, 0, 0, 0] = bad
    path = tmp_path / f"nan.{kind}"
    _write(kind, path, inputs=x)
    with pytest.raises(InvalidDataError, match=r"NaN or infinite values \(first in sample 123\)"):
        open_samples(path)


def test_check_labels_against_the_model_outputs(digits, tmp_path):
    x, y = digits
    labels = y.copy()
    labels[17] = 12
    np.savez(tmp_path / "l.npz", inputs=x, labels=labels)
    samples = open_samples(tmp_path / "l.npz")
    with pytest.raises(InvalidDataError, match=r"l\.npz: label 12 of sample 17 is outside"):
        check_labels(samples, 10)
    check_labels(samples, 13)
    np.savez(tmp_path / "u.npz", inputs=x)
    check_labels(open_samples(tmp_path / "u.npz"), 2)  # unlabeled: nothing to check


def test_pt_data_must_be_a_dict_of_tensors(tmp_path):
    torch.save([torch.zeros(3, 2)], tmp_path / "list.pt")
    with pytest.raises(InvalidDataError, match="must hold a dict of tensors"):
        open_samples(tmp_path / "list.pt")


def test_unrecognized_and_empty_data_files(tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3\n")
    with pytest.raises(InvalidDataError, match=r"x\.csv: not a recognized data file"):
        open_samples(tmp_path / "x.csv")
    (tmp_path / "e.npz").write_bytes(b"")
    with pytest.raises(InvalidDataError, match=r"e\.npz: the data file is empty"):
        open_samples(tmp_path / "e.npz")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(InvalidDataError, match=r"cut\.npz: corrupt or truncated zip"):
        open_samples(tmp_path / "cut.npz")


def test_a_model_given_as_data_is_named(tmp_path):
    model = torch.jit.script(DigitsNet().eval())
    torch.jit.save(model, str(tmp_path / "model.pt"))
    with pytest.raises(InvalidDataError, match=r"model\.pt is a model .*not data"):
        open_samples(tmp_path / "model.pt")
