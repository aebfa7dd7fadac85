"""The engine with several inputs and structured outputs (input_fn / call_fn), on real digits.

The oracle is torch's own BN layers run over the same batches (tests/worker/multi_input.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from recalib.errors import InvalidDataError
from tests.bn_oracle import assert_statistics_equal
from tests.worker.multi_input import TwoView, pooled_two_view
from worker.engine import positional_call, recalibrate


@pytest.fixture(scope="module")
def views(digits_case) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(digits_case.shifted_calibration[0])
    return x, torch.flip(x, dims=[3]) * 0.9 + 0.05


@pytest.fixture(scope="module")
def oracle(digits_case, views):
    model = TwoView(digits_case.model).eval()
    x, y = views
    return model, pooled_two_view(model, x, y, range(len(x)), 64)


def _batches(views, size=64):
    x, y = views
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_dict_inputs_are_passed_by_keyword(oracle, views) -> None:
    model, statistics = oracle
    model = copy.deepcopy(model)
    batches = [({"x": x, "y": y}, torch.zeros(len(x))) for x, y in _batches(views)]
    result = recalibrate(model, batches)
    assert result.samples == len(views[0]) and len(result.layers) == 5
    assert_statistics_equal(model, statistics)


def test_tuple_inputs_are_positional_and_call_fn_is_free(oracle, views) -> None:
    model, statistics = oracle
    positional = copy.deepcopy(model)
    recalibrate(positional, [((x, y),) for x, y in _batches(views)])
    assert_statistics_equal(positional, statistics)
    custom = copy.deepcopy(model)
    recalibrate(
        custom,
        [{"image": x, "mirror": y} for x, y in _batches(views)],
        input_fn=lambda batch: batch,
        call_fn=lambda m, b: m(b["image"], y=b["mirror"]),
    )
    assert_statistics_equal(custom, statistics)
    in_order = copy.deepcopy(model)
    recalibrate(in_order, [{"inputs": {"x": x, "y": y}} for x, y in _batches(views)],
                call_fn=positional_call)  # fmt: skip
    assert_statistics_equal(in_order, statistics)


def test_single_samples_merge_across_every_input(oracle, views) -> None:
    model, _ = oracle
    x, y = views
    pairs = [2] * ((len(x) - 3) // 2) + [3]  # pairs, and one triple for the odd count
    statistics = pooled_two_view(model, x, y, range(len(x)), 0, sizes=pairs)
    model = copy.deepcopy(model)
    batches = [({"x": x, "y": y},) for x, y in _batches(views, size=1)]
    result = recalibrate(model, batches, batch_size_range=(1, None))
    assert result.samples == len(views[0]) and result.batches == (len(views[0]) - 1) // 2
    assert result.merged_batches == result.samples - result.batches  # pairs and one triple
    assert_statistics_equal(model, statistics)


def test_scripted_model_takes_keyword_inputs(oracle, views) -> None:
    model, statistics = oracle
    scripted = torch.jit.script(copy.deepcopy(model))
    recalibrate(scripted, [({"x": x, "y": y},) for x, y in _batches(views)])
    assert_statistics_equal(scripted, statistics)


def test_inputs_of_different_sample_counts_are_an_error(oracle, views) -> None:
    model, _ = oracle
    x, y = views
    with pytest.raises(InvalidDataError, match=r"differ in their number of samples.*\[3, 4\]"):
        recalibrate(copy.deepcopy(model), [({"x": x[:4], "y": y[:3]},)])


def test_any_output_structure_recalibrates_alike(digits_case, views) -> None:
    class Nested(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = copy.deepcopy(digits_case.model)

        def forward(self, x: torch.Tensor) -> list[dict[str, object]]:
            logits = self.net(x)
            return [{"scores": row[row > 0], "meta": "kept"} for row in logits]

    plain, nested = copy.deepcopy(digits_case.model), Nested()
    x = views[0]
    recalibrate(plain, x.split(64))
    recalibrate(nested, x.split(64))
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), nested.net.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
