"""The demo's digits model: its training must not depend on the machine's threads or settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.digits import load_digits_arrays, split_indices, train_digits_model

EPOCHS = 2  # enough for reduction-order differences to show; the demo trains longer


@pytest.fixture(scope="module")
def train_split() -> tuple[np.ndarray, np.ndarray]:
    inputs, labels = load_digits_arrays()
    train, _, _ = split_indices(len(inputs), seed=0)
    return inputs[train], labels[train]


def _train_with_threads(threads: int, inputs: np.ndarray, labels: np.ndarray):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return train_digits_model(inputs, labels, epochs=EPOCHS).state_dict()
    finally:
        torch.set_num_threads(old)


def test_training_does_not_depend_on_the_thread_count(train_split) -> None:
    """A fresh machine with another core count must train the very same model (bit for bit)."""
    one = _train_with_threads(1, *train_split)
    two = _train_with_threads(2, *train_split)
    assert one.keys() == two.keys()
    differing = [key for key in one if not torch.equal(one[key], two[key])]
    assert differing == []


def test_training_restores_torch_settings_and_the_global_rng(train_split) -> None:
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(1234)
    expected_draw = torch.rand(3)
    torch.manual_seed(1234)
    model = train_digits_model(*train_split, epochs=1)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random stream is untouched
    assert torch.get_num_threads() == old_threads
    assert torch.are_deterministic_algorithms_enabled() == old_deterministic
    assert not model.training
    assert all(
        p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point()
    )
